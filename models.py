"""The encoder, the two decoders (Show and Tell; Show, Attend and Tell), the loss, and decoding.

Both decoders share one step API, which greedy decoding, beam search, validation, eval.py and
caption.py all go through, so search is written once:

    state = decoder.init_state(features)                              # features: B x P x D
    logits, state, alpha = decoder.step(prev_words, state, features)  # alpha: B x P, or None

`forward(features, captions, lengths)` is the fast teacher-forced path for training; it gives the
same logits as stepping (tested).
"""
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from hardware import fp32_lstm_under_bf16
from utils import InputError

TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- encoder

def load_resnet(arch, weights):
    """A torchvision ResNet with weights 'imagenet' (downloaded once into $TORCH_HOME), 'none', or a
    path to a saved ResNet state_dict (keys of layers the encoder drops may be missing)."""
    if not hasattr(torchvision.models, arch) or not arch.startswith("resnet"):
        raise InputError(f"unknown encoder {arch!r}: use resnet18, resnet34, resnet50, resnet101 or resnet152")
    net = torchvision.models.get_model(arch, weights=None)
    if weights == "imagenet":
        enum = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        try:
            state = enum.get_state_dict(progress=False, check_hash=True)
        except Exception as e:  # offline: URLError, or a half-downloaded file failing its hash
            name = os.path.basename(enum.url)
            hub = os.path.join(torch.hub.get_dir(), "checkpoints")
            raise InputError(
                f"cannot download the ImageNet weights of {arch} ({type(e).__name__}: {e}). Fetch {enum.url} "
                f"on a machine with internet (file {name}, sha256 starting {name.split('-')[-1][:8]}) and put "
                f"it in {hub}, or pass --encoder_weights /path/to/{name}") from None
        net.load_state_dict(state)
    elif weights not in (None, "none"):
        if not os.path.isfile(weights):
            raise InputError(f"encoder weights {weights} not found: give a ResNet state_dict file, "
                             "'imagenet' or 'none'")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise InputError(f"{weights} is not a loadable state_dict ({type(e).__name__}: {e})") from None
        result = net.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise InputError(f"{weights} does not fit {arch}: unexpected keys such as "
                             f"{result.unexpected_keys[0]}")
        return net, set(result.missing_keys)
    return net, set()


class Encoder(nn.Module):
    """ResNet trunk (conv1 .. layer{stages}) + adaptive average pooling to a grid.

    Takes uint8 images B x 3 x H x W and normalises them itself, so every caller feeds the same
    thing. Returns B x P x D features, P = encoded_size ** 2 grid cells, D = the last stage's width
    (2048 for resnet101 with 4 stages), plus 2 when `coords` appends each cell's x and y in [-1, 1]:
    pooled ResNet features hardly say where a cell is, and words like "left of" need it."""

    def __init__(self, arch="resnet101", weights="imagenet", encoded_size=14, stages=4, coords=False):
        super().__init__()
        if stages not in (1, 2, 3, 4):
            raise InputError(f"encoder_stages must be 1 to 4, got {stages}")
        resnet, missing = load_resnet(arch, weights)
        # Named like torchvision's ResNet, so self.net.state_dict() is itself a (partial) ResNet state_dict.
        names = TRUNK[: 4 + stages]
        self.net = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in names))
        layers = list(self.net.children())[4:]
        kept = tuple(f"{name}." for name in names)
        lost = sorted(k for k in missing if k.startswith(kept))
        if lost:
            raise InputError(f"{weights} lacks weights the encoder needs, such as {lost[0]}")
        self.pool = nn.AdaptiveAvgPool2d(encoded_size)
        self.dim = [m for m in layers[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features
        self.coords = coords
        if coords:
            self.dim += 2
            ramp = torch.linspace(-1, 1, encoded_size)
            grid = torch.stack([ramp.expand(encoded_size, -1), ramp[:, None].expand(-1, encoded_size)])
            self.register_buffer("grid", grid.flatten(1).t().contiguous(), persistent=False)  # P x 2 (x, y)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)
        self.fine_tune(False)

    def fine_tune(self, on=True):
        """Train conv blocks 2-4 (layer2..layer4) or nothing; the stem and layer1 stay frozen, as in
        the reference experiment."""
        if on and len(self.net) < 6:
            raise InputError("fine_tune_encoder: true trains ResNet blocks 2-4, but encoder_stages 1 keeps none")
        for p in self.net.parameters():
            p.requires_grad = False
        for block in list(self.net.children())[5:]:
            for p in block.parameters():
                p.requires_grad = on
        self.train(self.training)

    def train(self, mode=True):
        # Frozen blocks stay in eval mode: their BatchNorm statistics must not drift in training.
        self.training = mode
        for block in self.net.children():
            block.train(mode and any(p.requires_grad for p in block.parameters()))
        return self

    @property
    def frozen(self):
        return not any(p.requires_grad for p in self.parameters())

    def forward(self, images):
        x = (images.float() - self.mean) / self.std
        x = self.pool(self.net(x)).flatten(2).transpose(1, 2)  # B x P x D
        if self.coords:
            x = torch.cat([x, self.grid.to(x.dtype).expand(x.size(0), -1, -1)], dim=2)
        return x


# ----------------------------------------------------------------------------- decoders

class RNNDecoder(nn.Module):
    """Show and Tell: the image enters only through the initial LSTM state (Linear + BatchNorm of the
    mean-pooled encoding). One nn.LSTM layer, stepped one word at a time when decoding (as a cell
    would be) and run over the whole sequence in one fused call under teacher forcing."""

    image_state = ()  # state entries that depend on the image only, not on the words so far

    def __init__(self, vocab_size, encoder_dim, emb_dim=512, decoder_dim=512, dropout=0.5):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.init_h = nn.Sequential(nn.Linear(encoder_dim, decoder_dim), nn.BatchNorm1d(decoder_dim))
        self.init_c = nn.Sequential(nn.Linear(encoder_dim, decoder_dim), nn.BatchNorm1d(decoder_dim))
        self.lstm = nn.LSTM(emb_dim, decoder_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def init_state(self, features):
        mean = features.mean(1)
        return {"h": self.init_h(mean), "c": self.init_c(mean)}

    def _lstm(self, x, h, c):
        """x: B x T x E, h and c: B x H -> outputs B x T x H, (1 x B x H, 1 x B x H)."""
        hc = (h.unsqueeze(0).contiguous(), c.unsqueeze(0).contiguous())
        if fp32_lstm_under_bf16(x):
            with torch.autocast("cpu", enabled=False):
                return self.lstm(x.float(), tuple(s.float() for s in hc))
        return self.lstm(x, hc)

    def step(self, prev_words, state, features):
        out, (h, c) = self._lstm(self.embedding(prev_words).unsqueeze(1), state["h"], state["c"])
        return self.fc(self.dropout(out[:, 0])), {"h": h[0], "c": c[0]}, None

    def forward(self, features, captions, lengths):
        """captions: B x L with <start> first; returns logits B x T x V for T = max(lengths) - 1."""
        state = self.init_state(features)
        x = self.embedding(captions[:, : int(lengths.max()) - 1])  # B x T x E
        out, _ = self._lstm(x, state["h"], state["c"])
        return self.fc(self.dropout(out)), None


class Attention(nn.Module):
    """Additive (Bahdanau) attention over the grid cells."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def project(self, features):
        """The encoder side, computed once per image rather than once per word."""
        return self.encoder_att(features)

    def forward(self, features, projected, h):
        scores = self.full_att(torch.relu(projected + self.decoder_att(h).unsqueeze(1))).squeeze(2)
        alpha = torch.softmax(scores.float(), dim=1).to(features.dtype)  # B x P
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # B x D
        return context, alpha


class AttentionDecoder(nn.Module):
    """Show, Attend and Tell: LSTMCell input is [word embedding; sigmoid(f_beta(h)) * context]."""

    image_state = ("proj",)  # the projected grid: beam search need not reorder it between beams

    def __init__(self, vocab_size, encoder_dim, emb_dim=512, decoder_dim=512, attention_dim=512, dropout=0.5):
        super().__init__()
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim)
        self.cell = nn.LSTMCell(emb_dim + encoder_dim, decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)

    def init_state(self, features):
        mean = features.mean(1)
        return {"h": self.init_h(mean), "c": self.init_c(mean), "proj": self.attention.project(features)}

    def _cell(self, emb, state, features):
        context, alpha = self.attention(features, state["proj"], state["h"])
        gated = torch.sigmoid(self.f_beta(state["h"])) * context
        h, c = self.cell(torch.cat([emb, gated], dim=1), (state["h"], state["c"]))
        return h, {"h": h, "c": c, "proj": state["proj"]}, alpha

    def step(self, prev_words, state, features):
        h, state, alpha = self._cell(self.embedding(prev_words), state, features)
        return self.fc(self.dropout(h)), state, alpha

    def forward(self, features, captions, lengths):
        """Returns logits B x T x V and attention weights B x T x P, T = max(lengths) - 1. The whole
        batch runs every step (finished captions are masked in the loss): shrinking the batch as
        captions end costs more in bookkeeping than it saves."""
        state = self.init_state(features)
        emb = self.embedding(captions[:, : int(lengths.max()) - 1])  # B x T x E
        hs, alphas = [], []
        for t in range(emb.size(1)):
            h, state, alpha = self._cell(emb[:, t], state, features)
            hs.append(h)
            alphas.append(alpha)
        return self.fc(self.dropout(torch.stack(hs, 1))), torch.stack(alphas, 1)


def build_decoder(cfg, vocab_size, encoder_dim):
    common = dict(vocab_size=vocab_size, encoder_dim=encoder_dim, emb_dim=cfg["emb_dim"],
                  decoder_dim=cfg["decoder_dim"], dropout=cfg["dropout"])
    if cfg["decoder"] == "attention":
        return AttentionDecoder(attention_dim=cfg["attention_dim"], **common)
    return RNNDecoder(**common)


def build_encoder(cfg):
    return Encoder(cfg["encoder"], cfg["encoder_weights"], cfg["encoded_size"], cfg["encoder_stages"],
                   cfg["coord_channels"])


def load_model(ckpt, device):
    """A checkpoint's encoder and decoder in eval mode, checked against its own word map."""
    cfg, word_map = ckpt["config"], ckpt["word_map"]
    rows = ckpt["decoder"]["embedding.weight"].shape[0]
    if rows != len(word_map):
        raise InputError(f"the checkpoint's decoder knows {rows} words but its word map has {len(word_map)}: "
                         "it mixes two vocabularies")
    encoder = build_encoder(dict(cfg, encoder_weights="none"))
    decoder = build_decoder(cfg, len(word_map), encoder.dim)
    try:
        encoder.load_state_dict(ckpt["encoder"])
        decoder.load_state_dict(ckpt["decoder"])
    except RuntimeError as e:
        raise InputError(f"the checkpoint's weights do not fit its config ({str(e).splitlines()[1].strip()})") from None
    return encoder.to(device).eval(), decoder.to(device).eval()


# ----------------------------------------------------------------------------- loss

class CaptionLoss(NamedTuple):
    loss: torch.Tensor  # what backward() takes
    ce_sum: torch.Tensor  # cross-entropy summed over the tokens (detached)
    top5_hits: torch.Tensor  # tokens whose target is among the 5 most likely words
    tokens: torch.Tensor  # real tokens in the batch


def caption_loss(logits, alphas, captions, lengths, alpha_c=0.0, norm_tokens=None, norm_images=None):
    """Cross-entropy over real tokens only (the targets after <start>, up to and including <end>),
    plus the doubly stochastic term alpha_c * ((1 - sum_t alpha_t) ** 2).mean() for attention.

    Both are sums divided by norm_tokens and norm_images x P (default: this batch's own), so that the
    micro-batches of one accumulated step can share the whole step's normalisers. Everything but the
    loss is a detached tensor that stays on the device."""
    T = logits.size(1)
    targets = captions[:, 1 : T + 1]
    mask = torch.arange(T, device=logits.device)[None] < (lengths - 1)[:, None]  # B x T
    picked, wanted = logits[mask].float(), targets[mask]  # N x V, N
    tokens = mask.sum()
    ce_sum = F.cross_entropy(picked, wanted, reduction="sum")
    loss = ce_sum / (norm_tokens if norm_tokens is not None else tokens)
    if alphas is not None and alpha_c:
        attended = (alphas.float() * mask.unsqueeze(2)).sum(1)  # B x P, padded steps excluded
        images = norm_images if norm_images is not None else alphas.size(0)
        loss = loss + alpha_c * ((1.0 - attended) ** 2).sum() / (images * alphas.size(2))
    hits = (picked.topk(min(5, picked.size(1)), dim=1).indices == wanted[:, None]).any(1).sum()
    return CaptionLoss(loss, ce_sum.detach(), hits, tokens)


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


# ----------------------------------------------------------------------------- decoding

@dataclass(frozen=True)
class DecodeOptions:
    """How captions are searched for: what eval.py, caption.py and validation pass around."""
    beam_size: int = 1
    max_len: int = 50  # words at most; then <end> is forced
    length_penalty: float = 0.0  # scores are divided by length ** length_penalty (0: plain sums)
    block_ngram_repeat: int = 0  # forbid repeating an n-gram of this size (0: off)

    def __post_init__(self):
        if self.beam_size < 1 or self.max_len < 1 or self.length_penalty < 0 or self.block_ngram_repeat < 0:
            raise InputError(f"decoding needs beam size and max length >= 1 and the others >= 0, got {self}")


@dataclass
class Decoded:
    seqs: list  # per image: token ids, without <start>, ending with <end>
    scores: torch.Tensor  # per image: sum of log-probabilities (length-normalised when asked)
    alphas: list | None  # per image: len(seq) x P attention maps, one per generated token


@dataclass
class Caption:
    words: list  # without <start> and <end>
    score: float  # the search's score of the whole caption, <end> included
    alphas: torch.Tensor | None  # len(words) x P: where the attention decoder looked for each word


def decode(decoder, features, vocab, options=DecodeOptions()):
    """Greedy for beam 1, beam search otherwise: the one entry point to search. features: B x P x D."""
    if options.beam_size == 1 and not options.length_penalty and not options.block_ngram_repeat:
        return greedy(decoder, features, vocab, options.max_len)
    return beam_search(decoder, features, vocab, options)


@torch.no_grad()
def caption_images(encoder, decoder, vocab, images, options=DecodeOptions()):
    """Images (uint8 B x 3 x H x W, or encoder features B x P x D as the feature cache holds them) ->
    one Caption each. Validation, eval.py, caption.py and compare.py all caption through here."""
    features = encoder(images) if images.dtype == torch.uint8 else images.float()
    out = decode(decoder, features, vocab, options)
    captions = []
    for j, seq in enumerate(out.seqs):
        words = vocab.decode(seq)
        alphas = out.alphas[j][: len(words)] if out.alphas is not None else None
        captions.append(Caption(words, float(out.scores[j]), alphas))
    return captions


@dataclass
class Samples:
    seqs: torch.Tensor  # R x L token ids (R = images x samples, image-major), <end> included, 0 after it
    lengths: torch.Tensor  # R: tokens in each, <end> included
    logprob: torch.Tensor  # R: sum of the drawn tokens' log-probabilities, with the graph
    ended: torch.Tensor  # R: True where the caption ended in <end> by itself (not at max_len)


def sample(decoder, features, vocab, samples=5, max_len=16, temperature=1.0):
    """`samples` captions per image, each word drawn from the model's distribution (sharpened or
    flattened by `temperature` for the draw only), through the step API. The log-probability of each
    drawn word under the model stays in the autograd graph, so a reward can be backpropagated.
    <end> ends a caption, and is forced after max_len words; finished captions leave the batch.
    features: B x P x D; returns Samples over R = B x samples rows (image-major)."""
    feats = features.repeat_interleave(samples, 0)  # R x P x D
    R, L, dev = feats.size(0), max_len + 1, features.device
    state = decoder.init_state(feats)
    live = torch.arange(R, device=dev)  # rows still writing
    words = torch.full((R,), vocab.start, dtype=torch.long, device=dev)
    seqs = torch.zeros(R, L, dtype=torch.long, device=dev)
    lengths = torch.full((R,), L, dtype=torch.long, device=dev)
    ended = torch.zeros(R, dtype=torch.bool, device=dev)
    logprob = torch.zeros(R, device=dev)
    for t in range(L):
        logits, state, _ = decoder.step(words, state, feats)  # n x V
        logp = torch.log_softmax(logits.float(), dim=1)  # the model's own: what the loss needs
        with torch.no_grad():
            if t == max_len:
                words = torch.full_like(words, vocab.end)
            else:  # restricted on a new tensor: logp stays as autograd saw it
                draw = _allowed(logp.detach() / temperature, vocab, t, max_len)
                words = torch.multinomial(torch.softmax(draw, dim=1), 1).squeeze(1)  # n
        logprob = logprob.index_add(0, live, logp.gather(1, words[:, None]).squeeze(1))
        seqs[live, t] = words
        done = words == vocab.end  # n
        if t < max_len:
            ended[live[done]] = True
        lengths[live[done]] = t + 1
        if bool(done.all()):
            break
        if bool(done.any()):
            keep = ~done
            live, words, feats = live[keep], words[keep], feats[keep]
            state = {k: v[keep] for k, v in state.items()}
    return Samples(seqs, lengths, logprob, ended)


def _finish(seq, length, score, alphas):
    seqs = [s[:n].tolist() for s, n in zip(seq.cpu(), length.cpu(), strict=True)]
    maps = None if alphas is None else [a[:n].float().cpu() for a, n in zip(alphas, length.cpu(), strict=True)]
    return Decoded(seqs, score.float().cpu(), maps)


def _allowed(logp, vocab, t, max_len, history=None, block_ngram_repeat=0):
    """Next-word log-probabilities (rows x V, changed in place: the caller's own tensor) restricted to
    the words that may follow: never <pad> or <start> (never targets in training, yet an untrained
    model may pick them), only <end> at the max_len cut-off, and no word that would repeat an n-gram
    of `history` (rows x t+1, <start> first) when blocking is on. Every search and sampling use it."""
    logp[:, [vocab.pad, vocab.start]] = -math.inf
    if t == max_len:
        forced = torch.full_like(logp, -math.inf)
        forced[:, vocab.end] = logp[:, vocab.end]
        return forced
    if block_ngram_repeat:
        logp = _block_ngrams(logp, history, block_ngram_repeat)
    return logp


def _block_ngrams(logp, history, n):
    """Forbid the words that would repeat an n-gram already in each hypothesis."""
    if history.size(1) < n:
        return logp
    windows = history.unfold(1, n, 1)  # rows x W x n
    prefix = history[:, -(n - 1):] if n > 1 else history[:, :0]  # rows x n-1
    match = (windows[:, :, : n - 1] == prefix[:, None]).all(2)  # rows x W
    counts = torch.zeros_like(logp, dtype=torch.long).scatter_add_(1, windows[:, :, -1], match.long())
    return logp.masked_fill(counts > 0, -math.inf)


@torch.no_grad()
def greedy(decoder, features, vocab, max_len=50):
    """The most likely word at every step, for a batch. At most max_len words, then <end> is forced."""
    B, P = features.shape[:2]
    L, dev = max_len + 1, features.device
    state = decoder.init_state(features)
    words = torch.full((B,), vocab.start, dtype=torch.long, device=dev)  # B: the last word of each caption
    seq = torch.zeros(B, L, dtype=torch.long, device=dev)
    length = torch.full((B,), L, dtype=torch.long, device=dev)
    score = torch.zeros(B, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    alphas = None  # B x L x P
    for t in range(L):
        logits, state, alpha = decoder.step(words, state, features)  # B x V, ..., B x P or None
        best, words = _allowed(torch.log_softmax(logits.float(), dim=1), vocab, t, max_len).max(1)
        score += torch.where(done, 0.0, best)
        seq[:, t] = words
        if alpha is not None:
            alphas = alphas if alphas is not None else torch.zeros(B, L, P, device=dev)
            alphas[:, t] = alpha.float()
        ended = ~done & (words == vocab.end)
        length[ended] = t + 1
        done |= ended
        if bool(done.all()):
            break
    return _finish(seq, length, score, alphas)


@torch.no_grad()
def beam_search(decoder, features, vocab, options):
    """Beam search over a batch of images at once.

    Each image keeps beam_size live hypotheses. At every step the 2 * beam_size best extensions are
    ranked: those ending in <end> among the first beam_size are set aside as finished, the best
    beam_size others stay live, so the beam never runs short. An image stops when no live hypothesis
    can beat its best finished one (their log-probability can only fall), or at max_len words, where
    <end> is forced; stopped images leave the batch, and the search ends when none is left. Scores are
    sums of log-probabilities, divided by length ** length_penalty when that is not 0.

    The words of the live hypotheses are reordered at every step (n-gram blocking reads them); the
    attention maps are not: each step stores its maps and the beam every live hypothesis came from
    (a backpointer), and each image's maps are traced back once, at the end.
    """
    K, max_len, penalty = options.beam_size, options.max_len, options.length_penalty
    B, P = features.shape[:2]
    L, dev = max_len + 1, features.device
    # Each image's best finished hypothesis so far, and where it ended (for tracing its maps back).
    best_seq = torch.zeros(B, L, dtype=torch.long, device=dev)
    best_len = torch.full((B,), L, dtype=torch.long, device=dev)
    best_score = torch.full((B,), -math.inf, device=dev)
    best_step = torch.zeros(B, dtype=torch.long, device=dev)
    best_beam = torch.zeros(B, dtype=torch.long, device=dev)

    # The live hypotheses of the n images still searching: n x K of them, flattened to n*K rows.
    ids = torch.arange(B, device=dev)  # n: the images still searching
    state = {k: v.repeat_interleave(K, 0) for k, v in decoder.init_state(features).items()}  # n*K x ...
    feats = features.repeat_interleave(K, 0)  # n*K x P x D
    words = torch.full((B * K,), vocab.start, dtype=torch.long, device=dev)  # n*K: last word of each
    tokens = torch.zeros(B, K, L, dtype=torch.long, device=dev)  # n x K x L: the words so far
    score = torch.full((B, K), -math.inf, device=dev)  # n x K
    score[:, 0] = 0.0  # one live start; the other beams fill up at the first step
    parent = torch.zeros(L, B, K, dtype=torch.long, device=dev)  # step x image x beam: beam it came from
    attention = None  # L x B x K x P: each step's maps, by image
    for t in range(L):
        n = ids.numel()
        logits, state, alpha = decoder.step(words, state, feats)  # n*K x V, ..., n*K x P or None
        history = None
        if options.block_ngram_repeat:  # n*K x t+1, <start> first
            history = torch.cat([torch.full((n * K, 1), vocab.start, device=dev), tokens.view(n * K, L)[:, :t]], 1)
        logp = torch.log_softmax(logits.float(), dim=1)  # n*K x V
        logp = _allowed(logp, vocab, t, max_len, history, options.block_ngram_repeat)
        if alpha is not None:
            attention = attention if attention is not None else torch.zeros(L, B, K, P, device=dev)
            attention[t, ids] = alpha.float().view(n, K, P)
        V = logp.size(1)
        extensions = (score.view(n * K, 1) + logp).view(n, K * V)  # n x K*V: every one-word extension
        top_score, top = extensions.topk(min(2 * K, K * V), dim=1)  # n x 2K
        top_beam, top_word = top // V, top % V  # floor division: which beam, which word

        # Finished: the best candidate ending in <end> among the first K replaces a worse result.
        ended_score, at = _best_ended(top_score, top_word, vocab.end, K, (t + 1) ** penalty)  # n, n
        better = ended_score > best_score[ids]
        beam = top_beam.gather(1, at[:, None]).squeeze(1)  # n
        seq = tokens[torch.arange(n, device=dev), beam]  # n x L (a copy)
        seq[:, t] = vocab.end
        won = ids[better]
        best_seq[won], best_len[won], best_score[won] = seq[better], t + 1, ended_score[better]
        best_step[won], best_beam[won] = t, beam[better]

        # Live: the best K candidates that did not end.
        score, pick = _best_live(top_score, top_word, vocab.end, K)  # n x K, n x K
        from_beam, word = top_beam.gather(1, pick), top_word.gather(1, pick)  # n x K
        parent[t, ids] = from_beam
        rows = (torch.arange(n, device=dev)[:, None] * K + from_beam).view(-1)  # n*K: moves within an image
        state = {k: v if k in decoder.image_state else v[rows] for k, v in state.items()}
        tokens = tokens.view(n * K, L)[rows].view(n, K, L)
        tokens[:, :, t] = word
        words = word.view(-1)

        # An image is done when even its best live hypothesis cannot overtake its best finished one.
        done = best_score[ids] >= score[:, 0] / float(L) ** penalty  # n
        if t == max_len or bool(done.all()):
            break
        if bool(done.any()):  # stopped images leave the batch
            keep, rows = ~done, _rows_of(~done, K)  # n', n'*K
            ids, score, tokens = ids[keep], score[keep], tokens[keep]
            state = {k: v[rows] for k, v in state.items()}
            feats, words = feats[rows], words[rows]
    maps = None if attention is None else _trace_back(attention, parent, best_step, best_beam)
    return _finish(best_seq, best_len, best_score, maps)


def _best_ended(top_score, top_word, end, K, norm):
    """Per image, the best of its ranked candidates that ends in <end> within the first K ranks:
    (its score / norm, its rank); -inf where none does."""
    rank = torch.arange(top_score.size(1), device=top_score.device)[None]
    return (top_score.masked_fill((top_word != end) | (rank >= K), -math.inf) / norm).max(1)


def _best_live(top_score, top_word, end, K):
    """Per image, the K best ranked candidates that do not end: (their scores, their ranks), n x K."""
    return top_score.masked_fill(top_word == end, -math.inf).topk(K, dim=1)


def _rows_of(images, K):
    """The hypothesis rows (n*K layout) of the images marked in the boolean mask `images` (n)."""
    return (torch.nonzero(images).squeeze(1)[:, None] * K + torch.arange(K, device=images.device)).view(-1)


def _trace_back(attention, parent, step, beam):
    """Each image's attention maps (B x L x P), followed back through the backpointers from the step
    and beam where its best hypothesis ended."""
    L, B, _, P = attention.shape
    images = torch.arange(B, device=attention.device)
    maps = torch.zeros(B, L, P, device=attention.device)
    row = beam.clone()  # B: the beam each image's hypothesis held at step s
    for s in range(int(step.max()), -1, -1):
        row = torch.where(step == s, beam, row)
        inside = step >= s  # images whose hypothesis was still being written at step s
        maps[inside, s] = attention[s, images[inside], row[inside]]
        if s:
            row = torch.where(inside, parent[s - 1, images, row], row)
    return maps
