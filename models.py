"""The model: `ModelConfig` (what defines it), the encoder, the three decoders (Show and Tell; Show,
Attend and Tell; a Transformer) in the DECODERS registry, building them, and the loss.

Every decoder shares one step API, which greedy decoding, beam search, sampling, validation, eval.py
and caption.py all go through (decoding.py), so search is written once:

    state = decoder.init_state(features)                              # features: B x P x D
    logits, state, alpha = decoder.step(prev_words, state, features)  # alpha: B x P, or None

The state's contract (tests/test_decoders.py holds every decoder to it):
- it is a dict of tensors, each with the batch on dim 0 (B rows: one per image, or per hypothesis);
- the entries named in `decoder.image_state` depend on the image alone; beam search reorders every
  other entry when a hypothesis moves to another beam, and drops rows of finished images from all;
- everything a step needs is in the state, the position in the caption included (no extra argument).

`forward(features, captions, lengths)` is the fast teacher-forced path for training; it gives the
same logits as stepping (tested). The code asks a decoder's class what it has (Decoder's attributes:
maps, hard attention, ...), never its name.
"""
import hashlib
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hardware import fp32_lstm_under_bf16
from utils import InputError

TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelConfig:
    """The config keys that define a model's weights, and only those: every checkpoint saves them
    (`model`), and a resumed run or an --init_from run must ask for the same. Training settings
    (dropout, learning rates, ...) are not here. config.py takes these keys' bounds from the metadata,
    so adding a field here is all a new model setting needs besides its line in configs/default.yaml.
    Every field has configs/default.yaml's default (tested), so that a checkpoint written before a
    field existed loads with the value its model had."""
    decoder: str = "attention"  # a name of DECODERS (config.py takes the choices from there)
    encoder: str = "resnet101"  # resnet18 ... resnet152 (load_resnet checks the name)
    encoder_stages: int = field(default=4, metadata={"choices": (1, 2, 3, 4)})  # ResNet stages kept
    encoded_size: int = field(default=14, metadata={"min": 1})
    coord_channels: bool = False
    emb_dim: int = field(default=512, metadata={"min": 1})
    decoder_dim: int = field(default=512, metadata={"min": 1})
    attention_dim: int = field(default=512, metadata={"min": 1})
    transformer_layers: int = field(default=3, metadata={"min": 1})
    transformer_heads: int = field(default=8, metadata={"min": 1})
    transformer_dim: int = field(default=512, metadata={"min": 1})
    transformer_ff_dim: int = field(default=2048, metadata={"min": 1})
    transformer_positions: int = field(default=64, metadata={"min": 2})
    transformer_cell_positions: bool = True

    @classmethod
    def of(cls, cfg):
        """The model part of a flat run config (a checkpoint's config may predate some fields)."""
        return cls(**{f.name: cfg.get(f.name, f.default) for f in fields(cls)})

    @classmethod
    def of_checkpoint(cls, ckpt):
        """What a checkpoint's model is (from its config for checkpoints written before `model`)."""
        return cls(**ckpt["model"]) if "model" in ckpt else cls.of(ckpt["config"])

    @property
    def decoder_class(self):
        return decoder_class(self.decoder)

    def differences(self, other):
        """[(key, this value, the other's value)] where the two differ."""
        mine, theirs = asdict(self), asdict(other)
        return [(k, mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]]


# ----------------------------------------------------------------------------- encoder

def load_resnet(arch, weights):
    """A torchvision ResNet with weights 'imagenet' (downloaded once into $TORCH_HOME), 'none', or a
    path to a saved ResNet state_dict (keys of layers the encoder drops may be missing)."""
    import torchvision  # here: its import takes 2 s, which a script that builds no encoder need not wait for
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

    def trunk(self, images):
        """uint8 images B x 3 x H x W -> the last stage's grid B x C x h x w (h = H / 32 for 4 stages)."""
        return self.net((images.float() - self.mean) / self.std)

    def head(self, grid):
        """A grid B x C x g x g (the trunk's, or read from the feature cache) -> the decoders' features
        B x P x D: pooled to encoded_size x encoded_size cells, each cell's x, y appended."""
        # channels-last: the pooling kernel is 3x faster so, and B x P x C comes out without a copy
        x = self.pool(grid.contiguous(memory_format=torch.channels_last)).flatten(2).transpose(1, 2)  # B x P x C
        if self.coords:
            x = torch.cat([x, self.grid.to(x.dtype).expand(x.size(0), -1, -1)], dim=2)  # B x P x (C + 2)
        return x

    def forward(self, images):
        return self.head(self.trunk(images))

    def cache_grid(self, images):
        """What the feature cache keeps of uint8 images: the trunk's own grid (ResNet-101 at 256 px: 8 x 8,
        a third of the 14 x 14 cells pooling spreads it over), or the pooled grid where the trunk's is
        larger; head() of it is forward() of the images. B x C x g x g."""
        grid = self.trunk(images)
        if grid.shape[2] * grid.shape[3] > self.pool.output_size ** 2:
            grid = self.pool(grid)
        return grid


# ----------------------------------------------------------------------------- decoders

class Decoder(nn.Module):
    """What every decoder says of itself. Objectives, validation, eval.py, compare.py and report.py ask
    these, never a decoder's name."""
    returns_maps = False  # step() and forward() give attention maps over the grid cells
    hard_attention = False  # it can attend to one drawn cell (attention: hard; hard_inference)
    doubly_stochastic = False  # alpha_c's term (each cell's weight summed over the words near 1) applies
    image_batchnorm = False  # its initial state is normalised over the batch's images (group_by_image's note)
    image_state = ()  # state entries that depend on the image only: beam search need not reorder them
    dropout_key = "dropout"  # the config key of its dropout
    adam = {}  # Adam's settings besides the learning rate (torch's defaults when empty)
    max_len = None  # the most words it can decode (None: no limit)

    @classmethod
    def build(cls, model, vocab_size, encoder_dim, dropout):
        """The decoder of a ModelConfig."""
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg):
        """An InputError for what this decoder cannot do with a run config."""
        if cfg.get("attention") == "hard" and not cls.hard_attention:
            raise InputError(f"attention: hard draws one cell per word, which only the attention decoder does; "
                             f"the {cfg['decoder']} decoder takes attention: soft (give --decoder attention)")

    @classmethod
    def warmup_steps(cls, cfg):
        """Optimiser steps of linear warm-up before the learning rate decays (0: no schedule)."""
        return 0

    @classmethod
    def longest(cls, cfg):
        """The most words a decoder of this config can write (None: no limit); its max_len once built."""
        return None

    def set_inference(self, hard_inference):
        """How decoding attends: expected or argmax (hard attention); a no-op for the others."""


class RNNDecoder(Decoder):
    """Show and Tell: the image enters only through the initial LSTM state (Linear + BatchNorm of the
    mean-pooled encoding). One nn.LSTM layer, stepped one word at a time when decoding (as a cell
    would be) and run over the whole sequence in one fused call under teacher forcing."""

    image_batchnorm = True

    def __init__(self, vocab_size, encoder_dim, emb_dim=512, decoder_dim=512, dropout=0.5):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.init_h = nn.Sequential(nn.Linear(encoder_dim, decoder_dim), nn.BatchNorm1d(decoder_dim))
        self.init_c = nn.Sequential(nn.Linear(encoder_dim, decoder_dim), nn.BatchNorm1d(decoder_dim))
        self.lstm = nn.LSTM(emb_dim, decoder_dim, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)

    @classmethod
    def build(cls, model, vocab_size, encoder_dim, dropout):
        return cls(vocab_size, encoder_dim, model.emb_dim, model.decoder_dim, dropout)

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
        """features: N x P x D; captions: B x L with <start> first, B = N x k for k captions per image
        (image-major: group_by_image), whose initial state is computed once per image; returns logits
        B x T x V for T = max(lengths) - 1."""
        state = expand(self.init_state(features), captions.size(0) // features.size(0))  # B x H each
        x = self.embedding(captions[:, : int(lengths.max()) - 1])  # B x T x E
        out, _ = self._lstm(x, state["h"], state["c"])
        return self.fc(self.dropout(out)), None


class HardNoise(NamedTuple):
    """The draws of hard ("stochastic", Xu et al. 2015 section 4.1) attention: in the rows `sampled`
    a cell is drawn from alpha by the Gumbel-max trick with this noise (the other rows take the
    expected context, the alpha-weighted mean); with `tau`, a straight-through Gumbel-softmax draw (one
    cell forward, the relaxed draw's gradient backward; None: plain draws, for REINFORCE)."""
    gumbel: torch.Tensor  # B x T x P standard Gumbel noise for a forward; B x P for one step
    sampled: torch.Tensor  # B bool
    tau: float | None = None


ARGMAX = "argmax"  # a pick for decoding: the most likely cell, and its one-hot map


class Attention(nn.Module):
    """Additive (Bahdanau) attention over the grid cells: soft (the alpha-weighted mean of the cells)
    or, given one step's HardNoise (or ARGMAX), hard (one cell's features)."""

    def __init__(self, encoder_dim, decoder_dim, attention_dim):
        super().__init__()
        self.encoder_att = nn.Linear(encoder_dim, attention_dim)
        self.decoder_att = nn.Linear(decoder_dim, attention_dim)
        self.full_att = nn.Linear(attention_dim, 1)

    def project(self, features):
        """The encoder side, computed once per image rather than once per word."""
        return self.encoder_att(features)

    def forward(self, features, projected, h, pick=None):
        """features N x P x D and their projection N x P x A, h: B x H with B = N x k rows (k captions
        per image, image-major; k = 1 when decoding), each image's grid serving its k rows -> context
        B x D, alpha B x P (the distribution; one-hot for ARGMAX) and the cells picked (B, -1 where not
        sampled; None when soft)."""
        N, P = features.shape[:2]
        att_h = self.decoder_att(h).view(N, -1, 1, projected.size(2))  # N x k x 1 x A
        scores = self.full_att(torch.relu(projected.unsqueeze(1) + att_h)).squeeze(3).flatten(0, 1)  # B x P
        alpha = torch.softmax(scores.float(), dim=1).to(features.dtype)  # B x P
        weights, cells = (alpha, None) if pick is None else choose(scores, alpha, pick)  # B x P
        context = torch.bmm(weights.view(N, -1, P), features).flatten(0, 1)  # B x D
        return context, weights if pick is ARGMAX else alpha, cells


def choose(scores, alpha, pick):
    """Hard attention's weights (B x P: one-hot where a cell is picked, alpha where the expected context
    is used) and the cells picked (B, -1 where none is)."""
    logp = torch.log_softmax(scores.float(), dim=1)  # B x P
    if pick is ARGMAX:
        cells = logp.argmax(1)
        return F.one_hot(cells, logp.size(1)).to(alpha.dtype), cells
    cells = (logp + pick.gumbel).argmax(1)  # Gumbel-max: a draw from alpha
    hard = F.one_hot(cells, logp.size(1)).to(alpha.dtype)
    if pick.tau is not None:  # straight-through: forward the draw, backward the relaxed draw's gradient
        soft = torch.softmax((logp + pick.gumbel) / pick.tau, dim=1).to(alpha.dtype)
        hard = hard - soft.detach() + soft
    return torch.where(pick.sampled[:, None], hard, alpha), torch.where(pick.sampled, cells, -1)


class AttentionDecoder(Decoder):
    """Show, Attend and Tell: LSTMCell input is [word embedding; sigmoid(f_beta(h)) * context]. Soft
    attention by default; `argmax_attention` makes decoding attend to the most likely cell alone
    (hard attention's argmax inference), and forward() with a HardNoise draws cells (its training)."""

    returns_maps = hard_attention = doubly_stochastic = True
    image_state = ("proj",)  # the projected grid

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
        self.argmax_attention = False

    @classmethod
    def build(cls, model, vocab_size, encoder_dim, dropout):
        return cls(vocab_size, encoder_dim, model.emb_dim, model.decoder_dim, model.attention_dim, dropout)

    def set_inference(self, hard_inference):
        self.argmax_attention = hard_inference == "argmax"

    def init_state(self, features):
        mean = features.mean(1)
        return {"h": self.init_h(mean), "c": self.init_c(mean), "proj": self.attention.project(features)}

    def _cell(self, emb, state, features, pick=None):
        context, alpha, cells = self.attention(features, state["proj"], state["h"], pick)
        gated = torch.sigmoid(self.f_beta(state["h"])) * context
        h, c = self.cell(torch.cat([emb, gated], dim=1), (state["h"], state["c"]))
        return h, {"h": h, "c": c, "proj": state["proj"]}, alpha, cells

    def step(self, prev_words, state, features):
        h, state, alpha, _ = self._cell(self.embedding(prev_words), state, features,
                                        ARGMAX if self.argmax_attention else None)
        return self.fc(self.dropout(h)), state, alpha

    def forward(self, features, captions, lengths, noise=None):
        """features: N x P x D; captions: B x L, B = N x k for k captions per image (image-major); the
        initial state and the attention projection run once per image. Returns logits B x T x V and
        attention weights B x T x P, T = max(lengths) - 1; with `noise` (a HardNoise) the cells are
        drawn, and the cells picked (B x T, -1 where not sampled) come third. The whole batch runs every
        step (finished captions are masked in the loss): shrinking it as captions end costs more than
        it saves."""
        k = captions.size(0) // features.size(0)
        state = expand(self.init_state(features), k, keep=self.image_state)  # proj stays N x P x A
        emb = self.embedding(captions[:, : int(lengths.max()) - 1])  # B x T x E
        hs, alphas, picked = [], [], []
        for t in range(emb.size(1)):
            pick = None if noise is None else noise._replace(gumbel=noise.gumbel[:, t])  # B x P
            h, state, alpha, cells = self._cell(emb[:, t], state, features, pick)
            hs.append(h)
            alphas.append(alpha)
            picked.append(cells)
        out = self.fc(self.dropout(torch.stack(hs, 1))), torch.stack(alphas, 1)
        return out if noise is None else (*out, torch.stack(picked, 1))


class TransformerLayer(nn.Module):
    """One pre-norm decoder layer: x + SelfAttention(LN x), then x + CrossAttention(LN x, cells), then
    x + FeedForward(LN x), dropout on each block's output (Vaswani et al.'s residual dropout; none on the
    attention weights, whose random draws cost a quarter of a CPU training step). Attention runs in
    torch's fused kernel, except where the maps are wanted: the fused kernel does not return its
    weights, so that cross-attention is written out."""

    def __init__(self, dim, heads, ff_dim, dropout):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)  # over the cells: once per image
        self.cross_out = nn.Linear(dim, dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_dim), nn.ReLU(), nn.Linear(ff_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def split(self, x):
        """B x T x dim -> B x heads x T x dim / heads."""
        return x.view(x.size(0), x.size(1), self.heads, -1).transpose(1, 2)

    def merge(self, x):
        """B x heads x T x dim / heads -> B x T x dim."""
        return x.transpose(1, 2).flatten(2)

    def memory(self, cells):
        """The cells' keys and values, N x heads x P x dim / heads each, from cells N x P x dim."""
        keys, values = self.key_value(cells).chunk(2, dim=2)
        return self.split(keys), self.split(values)

    def forward(self, x, keys, values, cache=None, maps=False):
        """x: B x T x dim, the words so far; keys and values: the cells' of N images, B = N x k rows (k
        captions per image, image-major). Without a cache the whole caption runs at once under a causal
        mask; with one (this layer's self-attention keys and values of the t earlier words, B x heads x t x
        dim / heads each), x is the newest word (T = 1). Returns x, the cross-attention weights averaged
        over the heads (B x T x P) when `maps` asks for them (else None), and the cache with this word's
        keys and values added (None without one)."""
        q, k, v = (self.split(t) for t in self.qkv(self.norm1(x)).chunk(3, dim=2))  # B x H x T x dh each
        if cache is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # B x H x T x dh
        else:
            cache = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)  # B x H x t+1 x dh each
            a, _ = attend_one(q, *cache)
        x = x + self.dropout(self.self_out(self.merge(a)))
        q = self.split(self.query(self.norm2(x)))  # B x H x T x dh
        N, B, weights = keys.size(0), x.size(0), None
        if cache is not None:  # decoding: one row per image
            c, weights = attend_one(q, keys, values)  # B x H x 1 x dh, B x H x P
            weights = weights.mean(1, keepdim=True)  # B x 1 x P
        elif maps:  # by hand, for the weights: each image's cells serve its k rows without a copy
            q = q.reshape(N, B // N, *q.shape[1:])  # N x k x H x T x dh
            weights = torch.softmax((q @ keys.unsqueeze(1).transpose(3, 4)).float() / math.sqrt(q.size(-1)), -1)
            c = (weights.to(x.dtype) @ values.unsqueeze(1)).flatten(0, 1)  # B x H x T x dh
            weights = weights.flatten(0, 1).mean(1).to(x.dtype)  # B x T x P
        else:
            if B != N:  # k captions per image: the fused kernel wants a row of keys per caption
                keys, values = (t.repeat_interleave(B // N, 0) for t in (keys, values))
            c = F.scaled_dot_product_attention(q, keys, values)  # B x H x T x dh
        x = x + self.dropout(self.cross_out(self.merge(c)))
        x = x + self.dropout(self.ff(self.norm3(x)))
        return x, weights if maps else None, cache


def attend_one(q, keys, values):
    """Attention of one query per row and head (q: B x H x 1 x dh) over S keys and values (B x H x S x
    dh): the output B x H x 1 x dh and the weights B x H x S. What a decoding step needs; on a CPU two
    matmuls cost less than the fused kernel (which also keeps the weights to itself) at one query."""
    scores = (q @ keys.transpose(2, 3)).float() / math.sqrt(q.size(3))  # B x H x 1 x S
    weights = torch.softmax(scores, dim=3).to(q.dtype)
    return weights @ values, weights[:, :, 0]


class TransformerDecoder(Decoder):
    """A Transformer decoder (Vaswani et al. 2017) over the encoder grid: a stack of pre-norm layers of
    masked self-attention over the words so far, cross-attention over the projected cells and a feed-
    forward block. Learned word positions, and a learned 2D position per cell (a row's plus a column's
    embedding), since a pooled grid says little of where a cell is. Teacher forcing runs the whole
    caption in one pass under a causal mask; stepping keeps every layer's keys and values of the words
    so far (a cache), and the cells' keys and values, computed once per image, in the image's state.
    Its maps are the cross-attention averaged over the heads, of the layer `map_layer`, or averaged over
    the layers too when it is None, the default (scripts/transformer_maps.py measures each choice)."""
    returns_maps = True
    dropout_key = "transformer_dropout"  # a Transformer's usual 0.1, not the LSTMs' 0.5
    adam = {"betas": (0.9, 0.98), "eps": 1e-9}  # Vaswani et al.'s

    def __init__(self, vocab_size, encoder_dim, dim=512, layers=3, heads=8, ff_dim=2048, positions=64, grid=None,
                 dropout=0.1):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(positions, dim)
        self.cells = nn.Linear(encoder_dim, dim)
        self.rows = nn.Embedding(grid, dim) if grid else None
        self.columns = nn.Embedding(grid, dim) if grid else None
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, ff_dim, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, vocab_size)
        # the mean of the layers' maps: on the demo's VAL they point at the named object 91% of the time at
        # each of 3 seeds, the first layer's 53-93%, the second's 58-62% (scripts/transformer_maps.py)
        self.heads, self.max_len, self.map_layer = heads, positions - 1, None
        self.image_state = tuple(f"{kv}{i}" for i in range(layers) for kv in ("cell_keys", "cell_values"))

    @classmethod
    def build(cls, model, vocab_size, encoder_dim, dropout):
        return cls(vocab_size, encoder_dim, model.transformer_dim, model.transformer_layers, model.transformer_heads,
                   model.transformer_ff_dim, model.transformer_positions,
                   model.encoded_size if model.transformer_cell_positions else None, dropout)

    @classmethod
    def check_config(cls, cfg):
        super().check_config(cfg)
        if cfg["transformer_dim"] % cfg["transformer_heads"]:
            raise InputError(f"transformer_dim {cfg['transformer_dim']} must be a multiple of transformer_heads "
                             f"{cfg['transformer_heads']}")
        for key in ("max_decode_len", "scst_max_len"):
            if cfg[key] > cls.longest(cfg):
                raise InputError(f"{key} {cfg[key]} needs {cfg[key] + 1} word positions (the words and <end>), but "
                                 f"transformer_positions is {cfg['transformer_positions']}: raise it or lower {key}")

    @classmethod
    def warmup_steps(cls, cfg):
        return cfg["transformer_warmup"] if cfg["objective"] == "xe" else 0

    @classmethod
    def longest(cls, cfg):
        return cfg["transformer_positions"] - 1  # the words, then <end>

    def memory(self, features):
        """Each layer's (keys, values) of the cells, N x heads x P x dim / heads, from features N x P x D."""
        cells = self.cells(features)  # N x P x dim
        if self.rows is not None:
            if cells.size(1) != self.rows.num_embeddings ** 2:
                raise InputError(f"the features have {cells.size(1)} cells, the Transformer's cell positions a "
                                 f"{self.rows.num_embeddings} x {self.rows.num_embeddings} grid")
            where = self.rows.weight[:, None] + self.columns.weight[None]  # G x G x dim: row-major, as Encoder.head
            cells = cells + where.flatten(0, 1).to(cells.dtype)
        cells = self.dropout(cells)
        return [layer.memory(cells) for layer in self.layers]

    def init_state(self, features):
        B, dev = features.size(0), features.device
        state = {"position": torch.zeros(B, dtype=torch.long, device=dev)}  # B: the next word's position
        for i, (keys, values) in enumerate(self.memory(features)):
            state[f"cell_keys{i}"], state[f"cell_values{i}"] = keys, values
            empty = keys.new_zeros(B, self.heads, 0, keys.size(3))  # B x H x 0 x dh: no words yet
            state[f"keys{i}"], state[f"values{i}"] = empty, empty
        return state

    def step(self, prev_words, state, features):
        x = self.dropout(self.embedding(prev_words) + self.positions(state["position"]))[:, None]  # B x 1 x dim
        new, maps = {"position": state["position"] + 1}, []
        for i, layer in enumerate(self.layers):
            x, m, (new[f"keys{i}"], new[f"values{i}"]) = layer(
                x, state[f"cell_keys{i}"], state[f"cell_values{i}"], (state[f"keys{i}"], state[f"values{i}"]),
                self.shows(i))
            new[f"cell_keys{i}"], new[f"cell_values{i}"] = state[f"cell_keys{i}"], state[f"cell_values{i}"]
            maps.append(m)
        return self.fc(self.norm(x[:, 0])), new, self.chosen(maps)[:, 0]  # B x V, ..., B x P

    def forward(self, features, captions, lengths):
        """features: N x P x D; captions: B x L, B = N x k for k captions per image (image-major), the
        cells' keys and values computed once per image. Returns logits B x T x V and the maps
        B x T x P, T = max(lengths) - 1, every word in one pass."""
        T = int(lengths.max()) - 1
        if T > self.positions.num_embeddings:
            raise InputError(f"a caption of {T + 1} tokens needs {T} word positions, but transformer_positions is "
                             f"{self.positions.num_embeddings}: raise it")
        x = self.dropout(self.embedding(captions[:, :T]) + self.positions.weight[:T])  # B x T x dim
        maps = []
        for i, (layer, (keys, values)) in enumerate(zip(self.layers, self.memory(features), strict=True)):
            x, m, _ = layer(x, keys, values, maps=self.shows(i))
            maps.append(m)
        return self.fc(self.norm(x)), self.chosen(maps)

    def shows(self, layer):
        """Whether the maps need this layer's cross-attention weights."""
        return self.map_layer is None or layer == self.map_layer % len(self.layers)

    def chosen(self, maps):
        """The maps shown, of the layers' (B x T x P each, None where not asked for): map_layer's, or the
        mean of all for None."""
        return torch.stack(maps).mean(0) if self.map_layer is None else maps[self.map_layer]


DECODERS = {"rnn": RNNDecoder, "attention": AttentionDecoder, "transformer": TransformerDecoder}


def decoder_class(name):
    """The decoder class a config's `decoder` names; an unknown name is an error, never a fallback."""
    if name not in DECODERS:
        raise InputError(f"unknown decoder {name!r}: use {', '.join(DECODERS)}")
    return DECODERS[name]


def expand(state, k, keep=()):
    """A decoder state computed once per image, repeated for each of its k captions (image-major);
    the entries in `keep` stay per image."""
    if k == 1:
        return state
    return {name: v if name in keep else v.repeat_interleave(k, 0) for name, v in state.items()}


def build_encoder(model, weights="none"):
    """The Encoder of a ModelConfig, with `weights` (imagenet | none | a ResNet state_dict file)."""
    return Encoder(model.encoder, weights, model.encoded_size, model.encoder_stages, model.coord_channels)


def build_decoder(model, vocab_size, encoder_dim, dropout=0.0, hard_inference="expected"):
    """The decoder of a ModelConfig, decoding the way `hard_inference` says (hard attention only)."""
    decoder = model.decoder_class.build(model, vocab_size, encoder_dim, dropout)
    decoder.set_inference(hard_inference)
    return decoder


def features_of(encoder, images):
    """Encoder features B x P x D of uint8 images B x 3 x H x W, with a graph only where the encoder
    trains; or of the feature cache's grids (float16 B x C x g x g, Encoder.cache_grid), pooled here."""
    if images.dtype != torch.uint8:
        return encoder.head(images.float())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not encoder.frozen):
        return encoder(images)


def weights_id(ckpt):
    """A short fingerprint of a checkpoint's weights: eval.py's results say which model they score."""
    digest = hashlib.sha1()
    for part in ("encoder", "decoder"):
        for name, value in sorted(ckpt[part].items()):
            digest.update(name.encode() + value.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- loss

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
