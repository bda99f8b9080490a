"""The two LSTM decoders, Show and Tell (RNNDecoder) and Show, Attend and Tell (AttentionDecoder, soft or
hard attention), and `Decoder`, what every decoder says of itself. The Transformer is in transformer.py,
the registry of all three in models.py.

Every decoder shares one step API, which greedy decoding, beam search, sampling, validation, eval.py
and caption.py all go through (decoding.py), so search is written once:

    state = decoder.init_state(features)                              # features: N x P x D
    logits, state, alpha = decoder.step(prev_words, state, features)  # prev_words: B; alpha: B x P, or None

The state's contract (tests/test_decoders.py holds every decoder to it):
- it is a dict of tensors, each with the batch on dim 0;
- the entries named in `decoder.image_state` depend on the image alone and have one row per image
  (N, like the features); the others one per caption being written (B = N x k, image-major: beam
  search's k hypotheses of each image). A step takes both, so an image's work is never copied k times.
  Beam search reorders the caption entries when a hypothesis moves to another beam, and drops the rows
  of finished images from all;
- everything a step needs is in the state, the position in the caption included (no extra argument).

`forward(features, captions, lengths, maps=True)` is the fast teacher-forced path for training; it
gives the same logits as stepping (tested), and the maps unless a decoder whose maps cost extra work
(`maps_cost`) is told `maps=False`. The code asks a decoder's class what it has (Decoder's attributes:
maps, hard attention, ...), never its name.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hardware import fp32_lstm_under_bf16
from utils import InputError


class Decoder(nn.Module):
    """What every decoder says of itself. Objectives, validation, eval.py, compare.py and report.py ask
    these, never a decoder's name."""
    returns_maps = False  # step() and forward() give attention maps over the grid cells
    maps_cost = False  # forward(maps=False) saves work (else its maps come with the words: it ignores maps=)
    hard_attention = False  # it can attend to one drawn cell (attention: hard; hard_inference)
    doubly_stochastic = False  # alpha_c's term (each cell's weight summed over the words near 1) applies
    image_batchnorm = False  # its initial state is normalised over the batch's images (group_by_image's note)
    image_state = ()  # state entries that depend on the image only: beam search need not reorder them
    dropout_key = "dropout"  # the config key of its dropout
    training_bounds = {}  # its own training keys' least values (config.py checks them), as ModelConfig's fields have
    adam = {}  # Adam's settings besides the learning rate (torch's defaults when empty)
    max_len = None  # the most words it can decode (None: no limit)
    map_layers = 0  # layers whose maps its maps average (map_layer picks one of them instead); 0: one attention
    map_layer = None

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

    def attention_parameters(self):
        """The parameters whose gradients say how noisy the attention's training is (train.py logs their
        variance, which hard attention's estimators differ in); none where there is no one attention."""
        return []


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

    def forward(self, features, captions, lengths, maps=True):
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
    (hard attention's argmax inference), and forward() with a HardNoise draws cells (its training).
    Three design choices of the paper can be changed (docs/attention-maps.md measures each):
    `after_word` (attend_after_word) attends after the LSTM has read the word, `gate` (attention_gate)
    drops f_beta when false, and `grid` (attention_cell_positions) adds a learned position per cell to the
    attention's projection of the cells, as the Transformer adds one to its cells."""

    returns_maps = hard_attention = doubly_stochastic = True
    image_state = ("proj",)  # the projected grid

    def __init__(self, vocab_size, encoder_dim, emb_dim=512, decoder_dim=512, attention_dim=512, dropout=0.5,
                 after_word=False, gate=True, grid=None):
        super().__init__()
        self.attention = Attention(encoder_dim, decoder_dim, attention_dim)
        self.embedding = nn.Embedding(vocab_size, emb_dim)
        self.init_h = nn.Linear(encoder_dim, decoder_dim)
        self.init_c = nn.Linear(encoder_dim, decoder_dim)
        self.f_beta = nn.Linear(decoder_dim, encoder_dim) if gate else None
        self.cell = nn.LSTMCell(emb_dim + encoder_dim, decoder_dim)
        # attend_after_word: Luong et al. 2015's order, the output from h and the context it found
        self.combine = nn.Linear(decoder_dim + encoder_dim, decoder_dim) if after_word else None
        self.rows = nn.Embedding(grid, attention_dim) if grid else None  # attention_cell_positions
        self.columns = nn.Embedding(grid, attention_dim) if grid else None
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(decoder_dim, vocab_size)
        self.argmax_attention = False

    @classmethod
    def build(cls, model, vocab_size, encoder_dim, dropout):
        return cls(vocab_size, encoder_dim, model.emb_dim, model.decoder_dim, model.attention_dim, dropout,
                   model.attend_after_word, model.attention_gate,
                   model.encoded_size if model.attention_cell_positions else None)

    def set_inference(self, hard_inference):
        self.argmax_attention = hard_inference == "argmax"

    def attention_parameters(self):
        return list(self.attention.parameters())

    def init_state(self, features):
        mean = features.mean(1)
        state = {"h": self.init_h(mean), "c": self.init_c(mean),
                 "proj": add_cell_positions(self.attention.project(features), self.rows, self.columns)}
        if self.combine is not None:  # the context the LSTM reads with the next word: none before the first
            state["context"] = features.new_zeros(features.size(0), features.size(2))  # N x D
        return state

    def _gated(self, h, context):
        """The context as the LSTM reads it: scaled by the gate sigmoid(f_beta(h)) unless attention_gate is off."""
        return context if self.f_beta is None else torch.sigmoid(self.f_beta(h)) * context

    def _cell(self, emb, state, features, pick=None):
        """One word: the output B x H for fc, the new state, alpha B x P and the cells picked. The paper's
        order attends with the h of the previous word, then reads the word and the context; with
        attend_after_word the LSTM reads the word (and the previous context) first and attends with its
        new h, as Luong et al. 2015 do."""
        if self.combine is None:
            context, alpha, cells = self.attention(features, state["proj"], state["h"], pick)
            h, c = self.cell(torch.cat([emb, self._gated(state["h"], context)], dim=1), (state["h"], state["c"]))
            return h, {"h": h, "c": c, "proj": state["proj"]}, alpha, cells
        h, c = self.cell(torch.cat([emb, state["context"]], dim=1), (state["h"], state["c"]))
        context, alpha, cells = self.attention(features, state["proj"], h, pick)
        gated = self._gated(h, context)
        out = torch.tanh(self.combine(torch.cat([h, gated], dim=1)))  # B x H
        return out, {"h": h, "c": c, "proj": state["proj"], "context": gated}, alpha, cells

    def step(self, prev_words, state, features):
        h, state, alpha, _ = self._cell(self.embedding(prev_words), state, features,
                                        ARGMAX if self.argmax_attention else None)
        return self.fc(self.dropout(h)), state, alpha

    def forward(self, features, captions, lengths, noise=None, maps=True):
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


def add_cell_positions(cells, rows, columns):
    """cells N x P x dim plus a learned position per grid cell (a row's plus a column's embedding, G x dim
    each, row-major as Encoder.head flattens the grid); cells as they are when rows is None."""
    if rows is None:
        return cells
    if cells.size(1) != rows.num_embeddings ** 2:
        raise InputError(f"the features have {cells.size(1)} cells, the decoder's cell positions a "
                         f"{rows.num_embeddings} x {rows.num_embeddings} grid")
    where = rows.weight[:, None] + columns.weight[None]  # G x G x dim
    return cells + where.flatten(0, 1).to(cells.dtype)


def expand(state, k, keep=()):
    """A decoder state computed once per image, repeated for each of its k captions (image-major);
    the entries in `keep` stay per image."""
    if k == 1:
        return state
    return {name: v if name in keep else v.repeat_interleave(k, 0) for name, v in state.items()}
