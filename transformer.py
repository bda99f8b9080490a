"""The Transformer decoder (Vaswani et al. 2017) over the encoder's grid, on the step API of decoders.py
with a key/value cache; docs/transformer.md says what it is and how it compares.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from decoders import Decoder, add_cell_positions
from utils import InputError


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

    def forward(self, x, keys, values, maps=False):
        """Teacher forcing, every word at once under a causal mask. x: B x T x dim; keys and values:
        the cells' of N images, N x heads x P x dim / heads each, B = N x k rows (k captions per image,
        image-major). Returns x and the cross-attention weights averaged over the heads (B x T x P) when
        `maps` asks for them (else None)."""
        q, k, v = (self.split(t) for t in self.qkv(self.norm1(x)).chunk(3, dim=2))  # B x H x T x dh each
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # B x H x T x dh
        x = x + self.dropout(self.self_out(self.merge(a)))
        q = self.split(self.query(self.norm2(x)))  # B x H x T x dh
        N, B, weights = keys.size(0), x.size(0), None
        if maps:  # by hand, for the weights
            c, weights = attend_cells(q, keys.transpose(2, 3), values)  # B x T x dim, B x T x P
            weights = weights.to(x.dtype)
        else:
            if B != N:  # k captions per image: the fused kernel wants a row of keys per caption
                keys, values = (t.repeat_interleave(B // N, 0) for t in (keys, values))
            c = self.merge(F.scaled_dot_product_attention(q, keys, values))  # B x T x dim
        x = x + self.dropout(self.cross_out(c))
        return x + self.dropout(self.ff(self.norm3(x))), weights

    def step(self, x, keys_t, values, cache):
        """One decoding step: x, the newest word of each row, B x 1 x dim; keys_t the cells' keys
        transposed, N x heads x dim / heads x P (contiguous, made once per image: a product with a
        transposed view is slower at every step), values N x heads x P x dim / heads; cache this
        layer's self-attention keys and values of the t earlier words, B x 2 heads x t x dim / heads
        (the keys' heads, then the values': one tensor, so that growing and reordering it is one copy).
        Returns x, the cross-attention weights averaged over the heads (B x 1 x P) and the cache with
        this word's keys and values added."""
        B, H = x.size(0), self.heads
        qkv = self.qkv(self.norm1(x)).view(B, 3 * H, 1, -1)  # B x 3H x 1 x dh: one word, so a view
        cache = torch.cat([cache, qkv[:, H:]], 2)  # B x 2H x t+1 x dh
        a = F.scaled_dot_product_attention(qkv[:, :H], cache[:, :H], cache[:, H:])  # B x H x 1 x dh
        x = x + self.dropout(self.self_out(self.merge(a)))
        q = self.query(self.norm2(x)).view(B, H, 1, -1)  # B x H x 1 x dh
        c, weights = attend_cells(q, keys_t, values)  # B x 1 x dim, B x 1 x P
        x = x + self.dropout(self.cross_out(c))
        return x + self.dropout(self.ff(self.norm3(x))), weights.to(x.dtype), cache


def attend_cells(q, keys_t, values):
    """Cross-attention written out, for its weights: queries q (B x H x T x dh, B = N x k rows, k per
    image, image-major) over each image's cells (keys_t N x H x dh x P, values N x H x P x dh), which
    serve its k rows in one product, without a copy per row. Returns the output B x T x H dh (the heads
    merged) and the weights averaged over the heads, B x T x P in float32 (the softmax's precision)."""
    B, H, T, dh = q.shape
    N, k = keys_t.size(0), B // keys_t.size(0)
    q = q.reshape(N, k, H, T, dh).transpose(1, 2).reshape(N, H, k * T, dh)
    weights = torch.softmax((q @ keys_t).float() / math.sqrt(dh), -1)  # N x H x k*T x P
    c = (weights.to(values.dtype) @ values).view(N, H, k, T, dh).permute(0, 2, 3, 1, 4).reshape(B, T, H * dh)
    return c, weights.view(N, H, k, T, -1).mean(1).reshape(B, T, -1)


class TransformerDecoder(Decoder):
    """A Transformer decoder (Vaswani et al. 2017) over the encoder grid: a stack of pre-norm layers of
    masked self-attention over the words so far, cross-attention over the projected cells and a feed-
    forward block. Learned word positions, and a learned 2D position per cell (a row's plus a column's
    embedding), since a pooled grid says little of where a cell is. Teacher forcing runs the whole
    caption in one pass under a causal mask; stepping keeps every layer's keys and values of the words
    so far (a cache), and the cells' keys and values, computed once per image, in the image's state.
    Its maps are the cross-attention averaged over the heads, of the layer `map_layer`, or averaged over
    the layers too when it is None, the default (scripts/transformer_maps.py measures each choice)."""
    returns_maps = maps_cost = True
    dropout_key = "transformer_dropout"  # a Transformer's usual 0.1, not the LSTMs' 0.5
    training_bounds = {"transformer_dropout": 0.0, "transformer_warmup": 0}
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
        self.image_state = tuple(f"cell_{kv}{i}" for i in range(layers) for kv in ("keys", "values"))

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
        cells = add_cell_positions(self.cells(features), self.rows, self.columns)  # N x P x dim
        cells = self.dropout(cells)
        return [layer.memory(cells) for layer in self.layers]

    def init_state(self, features):
        B, dev = features.size(0), features.device
        state = {"position": torch.zeros(B, dtype=torch.long, device=dev)}  # B: the next word's position
        for i, (keys, values) in enumerate(self.memory(features)):
            state[f"cell_keys{i}"], state[f"cell_values{i}"] = keys.transpose(2, 3).contiguous(), values.contiguous()
            state[f"cache{i}"] = keys.new_zeros(B, 2 * self.heads, 0, keys.size(3))  # B x 2H x 0 x dh: no words
        return state

    def step(self, prev_words, state, features):
        x = self.dropout(self.embedding(prev_words) + self.positions(state["position"]))[:, None]  # B x 1 x dim
        new, maps = {"position": state["position"] + 1}, []
        for i, layer in enumerate(self.layers):
            cells = new[f"cell_keys{i}"], new[f"cell_values{i}"] = state[f"cell_keys{i}"], state[f"cell_values{i}"]
            x, m, new[f"cache{i}"] = layer.step(x, *cells, state[f"cache{i}"])
            maps.append(m if self.shows(i) else None)
        return self.fc(self.norm(x[:, 0])), new, self.chosen(maps)[:, 0]  # B x V, ..., B x P

    def forward(self, features, captions, lengths, maps=True):
        """features: N x P x D; captions: B x L, B = N x k for k captions per image (image-major), the
        cells' keys and values computed once per image. Returns logits B x T x V and the maps
        B x T x P (None when `maps` is false: then every attention runs in the fused kernel), T =
        max(lengths) - 1, every word in one pass."""
        T = int(lengths.max()) - 1
        if T > self.positions.num_embeddings:
            raise InputError(f"a caption of {T + 1} tokens needs {T} word positions, but transformer_positions is "
                             f"{self.positions.num_embeddings}: raise it")
        x = self.dropout(self.embedding(captions[:, :T]) + self.positions.weight[:T])  # B x T x dim
        shown = []
        for i, (layer, (keys, values)) in enumerate(zip(self.layers, self.memory(features), strict=True)):
            x, m = layer(x, keys, values, maps=maps and self.shows(i))
            shown.append(m)
        return self.fc(self.norm(x)), self.chosen(shown) if maps else None

    @property
    def map_layers(self):
        return len(self.layers)

    def shows(self, layer):
        """Whether the maps need this layer's cross-attention weights."""
        return self.map_layer is None or layer == self.map_layer % len(self.layers)

    def chosen(self, maps):
        """The maps shown, of the layers' (B x T x P each, None where not asked for): map_layer's, or the
        mean of all for None."""
        return torch.stack(maps).mean(0) if self.map_layer is None else maps[self.map_layer]
