"""The training objectives. Each is one nn.Module around the encoder and the decoder whose forward
takes a micro-batch and returns the loss to backpropagate and the step's named statistics, in the
manner of self-critical.pytorch's LossWrapper. Under torchrun DDP wraps the objective, so the
gradients of every objective, and of a fine-tuned encoder, are averaged by DDP alone.

    objective = build_objective(cfg, encoder, decoder, vocab, train_set)
    loss, sums = objective(batch, norm)     # norm: the whole optimiser step's Normalisers

- CrossEntropy: teacher forcing, the loss per real token (plus the doubly stochastic attention term).
- SelfCritical (Rennie et al. 2017): sample scst_samples captions per image through the step API,
  reward each with CIDEr-D against the image's TRAIN references (document frequencies from all TRAIN
  references, computed once), and minimise
      -(reward - baseline) x (sum of the sampled words' log-probabilities, <end> included)
  averaged over every sample of the step. The baseline is the mean reward of the image's other
  samples (`mean`, Luo 2020) or its greedy caption's reward (`greedy`, Rennie).
"""
from typing import NamedTuple

import torch
from torch import nn

from decoding import greedy, sample
from metrics import CiderD
from models import caption_loss, features_of


class Normalisers(NamedTuple):
    """What the losses of one optimiser step are divided by: the real tokens and the captions (for
    self-critical training: the images) of all its micro-batches on all ranks, so that N micro-batches
    on W ranks give exactly the gradient of one batch N x W times larger (DDP averages over the ranks,
    hence the division by W)."""
    tokens: torch.Tensor | int
    captions: torch.Tensor | int


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

    def features(self, images):
        return features_of(self.encoder, images)


class CrossEntropy(Objective):
    """Teacher-forced cross-entropy per real token, plus alpha_c x the doubly stochastic term."""

    def __init__(self, encoder, decoder, cfg):
        super().__init__(encoder, decoder, cfg)
        self.alpha_c = cfg["alpha_c"] if cfg["decoder"] == "attention" else 0.0

    def forward(self, batch, norm):
        """batch.image: N images (or cached grids); batch.caption: N x L, or N x k x L with k captions
        per image (group_by_image), whose image-only work then runs once per image, in the decoder."""
        captions, lengths = batch.caption.flatten(0, -2), batch.length.flatten()  # B x L, B
        logits, alphas = self.decoder(self.features(batch.image), captions, lengths)  # N x P x D features in
        loss = caption_loss(logits, alphas, captions, lengths, self.alpha_c, norm.tokens, norm.captions)
        return loss.loss, LossSums.of(loss, norm.tokens)


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

    def forward(self, batch, norm):
        """The loss of one micro-batch (one caption row per image), divided by the samples of the
        whole step (norm.captions x k)."""
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
                g = greedy(self.decoder, features.detach(), self.vocab, cfg["scst_max_len"])
            self.decoder.train(was_training)
            baseline = self.reward([s[:-1] for s in g.seqs], images.tolist()).view(-1, 1).expand(-1, k)  # no <end>
        advantage = (r - baseline).flatten().to(out.logprob.device, torch.float32)
        loss = -(advantage * out.logprob).sum() / (norm.captions * k)
        sums = torch.stack([r.sum(), baseline.sum(), (out.lengths - 1).sum().double().cpu(),
                            out.ended.sum().double().cpu(), torch.tensor(float(r.numel()), dtype=torch.float64)])
        return loss, RewardSums(sums.to(out.logprob.device))


def build_objective(cfg, encoder, decoder, vocab, train_set):
    """The objective that `cfg["objective"]` names."""
    if cfg["objective"] == "scst":
        return SelfCritical(encoder, decoder, cfg, vocab, Reward(train_references(train_set)))
    return CrossEntropy(encoder, decoder, cfg)
