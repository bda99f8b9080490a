"""The training objectives. Each is one nn.Module around the encoder and the decoder whose forward
takes a micro-batch and returns the loss to backpropagate and the step's named statistics, in the
manner of self-critical.pytorch's LossWrapper. Under torchrun DDP wraps the objective, so the
gradients of every objective, and of a fine-tuned encoder, are averaged by DDP alone.

    objective = build_objective(cfg, encoder, decoder, vocab, train_set, rank, world)
    loss, sums = objective(batch, step)     # step: what the micro-batch needs of its optimiser Step

- CrossEntropy: teacher forcing, the loss per real token (plus the doubly stochastic attention term).
- SelfCritical (Rennie et al. 2017): sample scst_samples captions per image through the step API,
  reward each with CIDEr-D against the image's TRAIN references (document frequencies from all TRAIN
  references, computed once), and minimise
      -(reward - baseline) x (sum of the sampled words' log-probabilities, <end> included)
  averaged over every sample of the step. The baseline is the mean reward of the image's other
  samples (`mean`, Luo 2020) or its greedy caption's reward (`greedy`, Rennie).
- HardAttention (Xu et al. 2015, section 4.1): the attention decoder picks one grid cell per word,
  drawn from alpha, trained by one of three estimators (hard_estimator): the paper's REINFORCE with a
  moving-average baseline, REINFORCE with several draws per caption and a leave-one-out baseline, or
  a straight-through Gumbel-softmax.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import distributed
from decoding import greedy, sample
from metrics import CiderD
from decoders import HardNoise
from encoder import features_of


class CaptionLoss(NamedTuple):
    loss: torch.Tensor  # what backward() takes
    ce_sum: torch.Tensor  # cross-entropy summed over the tokens (detached)
    top5_hits: torch.Tensor  # tokens whose target is among the 5 most likely words
    tokens: torch.Tensor  # real tokens in the batch


def caption_loss(logits, alphas, captions, lengths, alpha_c=0.0, norm_tokens=None, norm_images=None,
                 label_smoothing=0.0):
    """Cross-entropy over real tokens only (the targets after <start>, up to and including <end>),
    plus the doubly stochastic term alpha_c * ((1 - sum_t alpha_t) ** 2).mean() for attention. With
    label_smoothing the loss (not ce_sum, which stays the plain cross-entropy) targets 1 - label_smoothing
    on the reference word and the rest spread evenly over the vocabulary.

    Both are sums divided by norm_tokens and norm_images x P (default: this batch's own), so that the
    micro-batches of one accumulated step can share the whole step's normalisers. Everything but the
    loss is a detached tensor that stays on the device."""
    T = logits.size(1)
    targets = captions[:, 1 : T + 1]
    mask = torch.arange(T, device=logits.device)[None] < (lengths - 1)[:, None]  # B x T
    picked, wanted = logits[mask].float(), targets[mask]  # N x V, N
    tokens = mask.sum()
    ce_sum = F.cross_entropy(picked, wanted, reduction="sum")
    trained = F.cross_entropy(picked, wanted, reduction="sum", label_smoothing=label_smoothing) \
        if label_smoothing else ce_sum
    loss = trained / (norm_tokens if norm_tokens is not None else tokens)
    if alphas is not None and alpha_c:
        attended = (alphas.float() * mask.unsqueeze(2)).sum(1)  # B x P, padded steps excluded
        images = norm_images if norm_images is not None else alphas.size(0)
        loss = loss + alpha_c * ((1.0 - attended) ** 2).sum() / (images * alphas.size(2))
    hits = (picked.topk(min(5, picked.size(1)), dim=1).indices == wanted[:, None]).any(1).sum()
    return CaptionLoss(loss, ce_sum.detach(), hits, tokens)


class Step(NamedTuple):
    """What a micro-batch's loss needs of its optimiser step. The losses are divided by the real tokens
    and the captions (for self-critical training: the images) of all the step's micro-batches on all
    ranks, so that N micro-batches on W ranks give exactly the gradient of one batch N x W times larger
    (DDP averages over the ranks, hence the division by W). `seed` seeds the random draws of hard
    attention for this micro-batch, the same on every rank: each rank takes its rows of the global
    micro-batch's draws, so W processes draw what one process draws at the global batch."""
    tokens: torch.Tensor | int
    captions: torch.Tensor | int
    seed: int = 0


class LossSums:
    """Sums over batches of what a training step reports: for cross-entropy, the loss x its
    normalising token count, the cross-entropy, the top-5 hits and the tokens. One float64 tensor on
    the device, so adding needs no host sync and the ranks sum it in one all-reduce; per_token()
    divides the others by the last field."""
    FIELDS = ("loss", "ce", "top5", "tokens")

    def __init__(self, values=None, device="cpu"):
        self.values = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device) if values is None else values

    @classmethod
    def of(cls, loss, norm_tokens=None):
        """The sums of one CaptionLoss (its loss counted norm_tokens times: default, its own tokens)."""
        norm = loss.tokens if norm_tokens is None else norm_tokens
        return cls(torch.stack([loss.loss.detach() * norm, loss.ce_sum, loss.top5_hits.float(),
                                loss.tokens.float()]).double())

    def __iadd__(self, other):
        self.values += other.values
        return self

    def to(self, device):
        return type(self)(self.values.to(device))

    def per_token(self):
        """{field: sum / count} for every field but the last (the count), or {} when it is 0."""
        *sums, count = self.values.tolist()
        return {k: v / count for k, v in zip(self.FIELDS, sums, strict=False)} if count else {}


class AttentionSums(LossSums):
    """For the attention decoder, the cross-entropy sums and the entropy of alpha summed over the words
    (per_token: its mean, in nats; ln P for a uniform map)."""
    FIELDS = ("loss", "ce", "top5", "entropy", "tokens")

    @classmethod
    def of(cls, loss, norm_tokens, entropy):
        sums = LossSums.of(loss, norm_tokens).values
        return cls(torch.cat([sums[:3], entropy.detach().double().reshape(1), sums[3:]]))


def map_entropy(alphas, lengths):
    """The entropy of each real word's map, summed (alphas: B x T x P), and log alpha (clamped: a cell
    alpha gives ~0 can still be drawn). In float32, or float64 for float64 maps."""
    alphas = alphas if alphas.dtype == torch.float64 else alphas.float()
    mask = torch.arange(alphas.size(1), device=alphas.device)[None] < (lengths - 1)[:, None]  # B x T
    log_alpha = torch.log(alphas.clamp_min(1e-10))
    return (-(alphas * log_alpha).sum(2) * mask).sum(), log_alpha, mask


class RewardSums(LossSums):
    """The same for self-critical training: sums over the sampled captions of the reward, the
    baseline, the length in words and whether <end> ended it, and the count of samples."""
    FIELDS = ("reward", "baseline", "sample_length", "ended", "samples")


class Objective(nn.Module):
    """The encoder and decoder, and how a micro-batch becomes a loss (subclasses)."""
    Sums = LossSums  # what forward reports

    def __init__(self, encoder, decoder, cfg):
        super().__init__()
        self.encoder, self.decoder, self.cfg = encoder, decoder, cfg
        self.alpha_c = cfg["alpha_c"] if decoder.doubly_stochastic else 0.0  # the one place of this rule
        self.label_smoothing = cfg.get("label_smoothing", 0.0)

    def features(self, images):
        return features_of(self.encoder, images)

    def teacher_forced(self, features, captions, lengths, norm_tokens=None, norm_images=None, maps=False):
        """The decoder's teacher-forced CaptionLoss (with alpha_c's term where it applies) and its maps
        (None for a decoder without, or one whose maps cost work when `maps` is false and alpha_c does
        not use them): training's cross-entropy and validation's loss both come from here."""
        logits, alphas = self.decoder(features, captions, lengths, maps=maps or bool(self.alpha_c))
        return caption_loss(logits, alphas, captions, lengths, self.alpha_c, norm_tokens, norm_images,
                            self.label_smoothing), alphas


class CrossEntropy(Objective):
    """Teacher-forced cross-entropy per real token, plus alpha_c x the doubly stochastic term."""

    def __init__(self, encoder, decoder, cfg):
        super().__init__(encoder, decoder, cfg)
        # the maps' entropy is logged where the maps come anyway or the loss uses them (not the Transformer's:
        # writing its attention out for the weights costs a fifth of its step; eval.py measures its maps)
        self.Sums = AttentionSums if decoder.returns_maps and (self.alpha_c or not decoder.maps_cost) else LossSums

    def forward(self, batch, step):
        """batch.image: N images (or cached grids); batch.caption: N x L, or N x k x L with k captions
        per image (group_by_image), whose image-only work then runs once per image, in the decoder."""
        captions, lengths = batch.caption.flatten(0, -2), batch.length.flatten()  # B x L, B
        loss, alphas = self.teacher_forced(self.features(batch.image), captions, lengths, step.tokens, step.captions,
                                           maps=self.Sums is AttentionSums)
        if alphas is None:
            return loss.loss, LossSums.of(loss, step.tokens)
        with torch.no_grad():
            entropy = map_entropy(alphas, lengths)[0]
        return loss.loss, AttentionSums.of(loss, step.tokens, entropy)


def train_references(dataset):
    """Per TRAIN image, its encoded captions as tuples of word ids (without <start>, <end>, <pad>)."""
    captions, lengths = dataset.captions.tolist(), dataset.caplens.tolist()
    return [[tuple(captions[i][1:lengths[i] - 1]) for i in range(img * dataset.cpi, (img + 1) * dataset.cpi)]
            for img in range(dataset.num_images)]


class Reward:
    """CIDEr-D of sampled captions (word ids) against the TRAIN references of their images."""

    def __init__(self, references):
        self.references = references
        self.cider = CiderD(references)

    def __call__(self, captions, images):
        """captions: word-id sequences without <end>; images: their TRAIN indices -> rewards (float64)."""
        return torch.tensor(self.cider.score(captions, [self.references[i] for i in images]), dtype=torch.float64)


class SelfCritical(Objective):
    """REINFORCE on the CIDEr-D reward of sampled captions, against the mean or the greedy baseline."""
    Sums = RewardSums

    def __init__(self, encoder, decoder, cfg, vocab, reward):
        super().__init__(encoder, decoder, cfg)
        self.vocab, self.reward = vocab, reward

    def forward(self, batch, step):
        """The loss of one micro-batch (one caption row per image), divided by the samples of the
        whole step (step.captions x k)."""
        cfg, k = self.cfg, self.cfg["scst_samples"]
        features = self.features(batch.image)  # B x P x D
        for m in self.decoder.modules():  # the plain decoder's initial-state BatchNorm would see k copies of each image
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        out = sample(self.decoder, features, self.vocab, k, cfg["scst_max_len"])  # R = B x k rows
        sampled = [s[: n - 1] for s, n in zip(out.seqs.tolist(), out.lengths.tolist(), strict=True)]
        images = batch.index.cpu()
        r = self.reward(sampled, images.repeat_interleave(k).tolist()).view(-1, k)  # B x k
        if cfg["scst_baseline"] == "mean":
            baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
        else:
            was_training = self.decoder.training
            self.decoder.eval()
            with torch.no_grad():
                g = greedy(self.decoder, features.detach(), self.vocab, cfg["scst_max_len"], "scst_max_len")
            self.decoder.train(was_training)
            baseline = self.reward([s[:-1] for s in g.seqs], images.tolist()).view(-1, 1).expand(-1, k)  # no <end>
        advantage = (r - baseline).flatten().to(out.logprob.device, torch.float32)
        loss = -(advantage * out.logprob).sum() / (step.captions * k)
        sums = torch.stack([r.sum(), baseline.sum(), (out.lengths - 1).sum().double().cpu(),
                            out.ended.sum().double().cpu(), torch.tensor(float(r.numel()), dtype=torch.float64)])
        return loss, RewardSums(sums.to(out.logprob.device))


class HardAttention(Objective):
    """Hard attention (Xu et al. 2015, section 4.1): at each word the decoder attends to one cell
    s_t ~ alpha_t, in a share hard_sample_p of the captions (the others use the expected context, as
    the paper does for half of them). The loss, per token of the step, is the likelihood's plus

        hard_lambda_r x (L - b) x sum_t log alpha_t[s_t]  -  hard_lambda_e x sum_t H[alpha_t]

    for the sampling captions, L being the caption's summed cross-entropy (nats) and b a baseline: the
    gradient is the paper's estimator of the lower bound's. Padded steps count for neither term. The
    estimators (hard_estimator):
    - reinforce: the paper's; b a moving average of L, b <- 0.9 b + 0.1 mean(L), over the global batch
      (so every rank keeps the same), started at the first batch's mean, saved with the run.
    - loo: hard_samples draws of the cells per caption, each with the mean L of the others as its b.
    - gumbel: a straight-through Gumbel-softmax draw (hard_tau): one cell forward, the relaxed draw's
      gradient backward; biased, low-variance; no REINFORCE term.
    alpha_c's doubly stochastic term applies to the distributions alpha, as in soft attention."""
    Sums = AttentionSums

    def __init__(self, encoder, decoder, cfg, rank=0, world=1):
        super().__init__(encoder, decoder, cfg)
        self.rank, self.world = rank, world
        self.estimator = cfg["hard_estimator"]
        self.draws = cfg["hard_samples"] if self.estimator == "loo" else 1
        self.register_buffer("baseline", torch.tensor(math.nan, dtype=torch.float64))

    def noise(self, step, rows, steps, cells, device):
        """This rank's HardNoise: drawn for the whole global micro-batch from `step.seed`, its rows taken."""
        g = torch.Generator().manual_seed(step.seed)
        total = rows * self.world
        sampled = torch.rand(total, generator=g) < self.cfg["hard_sample_p"]
        gumbel = -torch.log(-torch.log(torch.rand(total, self.draws, steps, cells, generator=g).clamp(1e-20, 1.0)))
        mine = slice(self.rank, total, self.world)
        gumbel = gumbel[mine].flatten(0, 1).to(device)  # rows*draws x steps x cells
        tau = self.cfg["hard_tau"] if self.estimator == "gumbel" else None
        return HardNoise(gumbel, sampled[mine].repeat_interleave(self.draws).to(device), tau)

    def forward(self, batch, step):
        captions, lengths = batch.caption.flatten(0, -2), batch.length.flatten()  # B x L, B
        features = self.features(batch.image)  # N x P x D
        B, D = captions.size(0), self.draws
        noise = self.noise(step, B, captions.size(1) - 1, features.size(1), features.device)
        if D > 1:  # loo: each caption D times; the images' work still runs once (grouped rows)
            captions, lengths = captions.repeat_interleave(D, 0), lengths.repeat_interleave(D, 0)  # B*D x L
        T = int(lengths.max()) - 1
        logits, alphas, cells = self.decoder(features, captions, lengths, noise._replace(gumbel=noise.gumbel[:, :T]))
        tokens, rows = step.tokens * D, step.captions * D  # the likelihood: the mean over the D draws
        loss = caption_loss(logits, alphas, captions, lengths, self.alpha_c, tokens, rows, self.label_smoothing)
        entropy, log_alpha, mask = map_entropy(alphas, lengths)  # summed over real words; B*D x T x P; B*D x T
        total = loss.loss - self.cfg["hard_lambda_e"] * entropy / tokens
        if self.estimator != "gumbel":  # REINFORCE: each caption's summed cross-entropy L, against a baseline
            with torch.no_grad():
                nll = F.cross_entropy(logits.float().transpose(1, 2), captions[:, 1:T + 1], reduction="none")  # B*D x T
                L = (nll * mask).sum(1)
            picked = log_alpha.gather(2, cells.clamp_min(0).unsqueeze(2)).squeeze(2) * mask * noise.sampled[:, None]
            baseline = self.baselines(L, noise.sampled)
            total = total + self.cfg["hard_lambda_r"] * ((L - baseline) * noise.sampled * picked.sum(1)).sum() / tokens
        return total, AttentionSums.of(loss, tokens, entropy)

    def baselines(self, L, sampled):
        """Each sampling caption's baseline: the moving average before this batch (reinforce), or the
        mean L of the caption's other draws (loo)."""
        if self.estimator == "loo":
            per = L.view(-1, self.draws)
            return ((per.sum(1, keepdim=True) - per) / (self.draws - 1)).flatten()
        with torch.no_grad():
            total = distributed.all_sum(torch.stack([(L * sampled).sum().double(), sampled.sum().double()]))
            mean = total[0] / total[1].clamp_min(1)  # over the global batch: every rank keeps the same
            started = not torch.isnan(self.baseline)
            old = self.baseline.clone() if started else mean  # the first batch starts the average
            if total[1] > 0:
                self.baseline.copy_(0.9 * self.baseline + 0.1 * mean if started else mean)
        return old.to(L.dtype)


def build_objective(cfg, encoder, decoder, vocab, train_set, rank=0, world=1):
    """The objective that `cfg["objective"]` (and, for cross-entropy, `cfg["attention"]`) names."""
    if cfg["objective"] == "scst":
        return SelfCritical(encoder, decoder, cfg, vocab, Reward(train_references(train_set)))
    if cfg["attention"] == "hard":  # config.py refuses it for a decoder without hard attention
        return HardAttention(encoder, decoder, cfg, rank, world)
    return CrossEntropy(encoder, decoder, cfg)
