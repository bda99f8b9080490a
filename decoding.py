"""Decoding through the decoders' one step API: greedy, batched beam search, and sampling.

Every search goes through `decoder.init_state(features)` and `decoder.step(prev_words, state,
features)` (decoders.py), so validation, eval.py, caption.py and self-critical training decode the same
way. `caption_images` is the one path from images to words; `sample` draws captions with their
log-probabilities for self-critical training.
"""
import math
from dataclasses import dataclass, field

import torch

from decoders import expand
from encoder import features_of
from utils import InputError, as_typed

@dataclass(frozen=True)
class DecodeOptions:
    """How captions are searched for: what eval.py, caption.py and validation pass around."""
    beam_size: int = 1
    max_len: int = 50  # words at most; then <end> is forced
    length_penalty: float = 0.0  # scores are divided by length ** length_penalty (0: plain sums)
    block_ngram_repeat: int = 0  # forbid repeating an n-gram of this size (0: off)
    # how the user gave max_len ("--max-len", "max_len=", "max_decode_len"), for the message that refuses it
    max_len_name: str = field(default="max_len=", compare=False)

    def __post_init__(self):
        for name, low in (("beam_size", 1), ("max_len", 1), ("length_penalty", 0), ("block_ngram_repeat", 0)):
            if getattr(self, name) < low:
                raise InputError(f"{name} must be at least {low}, got {getattr(self, name)}")


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


def check_length(longest, max_len, name):
    """An InputError when a decoder that can write at most `longest` words (None: no limit; the
    Transformer's position table sets one) is asked for max_len, which the user gave as `name`. Every
    search checks (greedy, beam_search, sample); a script may check earlier, before its work."""
    if longest is not None and max_len > longest:
        raise InputError(f"{as_typed(name, max_len)} is more words than the decoder has positions for: its "
                         f"transformer_positions allow {longest} words and <end>; give {as_typed(name, longest)} or "
                         "less")


def decode(decoder, features, vocab, options=DecodeOptions()):
    """Greedy for beam 1, beam search otherwise: the one entry point to search. features: B x P x D."""
    if options.beam_size == 1 and not options.length_penalty and not options.block_ngram_repeat:
        return greedy(decoder, features, vocab, options.max_len, options.max_len_name)
    return beam_search(decoder, features, vocab, options)


@torch.no_grad()
def caption_images(encoder, decoder, vocab, images, options=DecodeOptions()):
    """Images (uint8 B x 3 x H x W, or the feature cache's grids B x C x g x g) -> one Caption each.
    eval.py, caption.py and the Python API caption through here."""
    return caption_features(decoder, vocab, features_of(encoder, images), options)


@torch.no_grad()
def caption_features(decoder, vocab, features, options=DecodeOptions()):
    """The decoders' features B x P x D -> one Caption each (validation has them already)."""
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
    features: B x P x D; returns Samples over R = B x samples rows (image-major). The initial state
    (and the attention projection) is computed once per image, then repeated for its samples."""
    check_length(decoder.max_len, max_len, "scst_max_len")
    state = expand(decoder.init_state(features), samples)  # R x ... each
    feats = features.repeat_interleave(samples, 0)  # R x P x D: rows leave one by one as they end
    R, L, dev = feats.size(0), max_len + 1, features.device
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
def greedy(decoder, features, vocab, max_len=50, max_len_name="max_len="):
    """The most likely word at every step, for a batch. At most max_len words, then <end> is forced."""
    check_length(decoder.max_len, max_len, max_len_name)
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
    check_length(decoder.max_len, options.max_len, options.max_len_name)
    K, max_len, penalty = options.beam_size, options.max_len, options.length_penalty
    B, P = features.shape[:2]
    L, dev = max_len + 1, features.device
    # Each image's best finished hypothesis so far, and where it ended (for tracing its maps back).
    best_seq = torch.zeros(B, L, dtype=torch.long, device=dev)
    best_len = torch.full((B,), L, dtype=torch.long, device=dev)
    best_score = torch.full((B,), -math.inf, device=dev)
    best_step = torch.zeros(B, dtype=torch.long, device=dev)
    best_beam = torch.zeros(B, dtype=torch.long, device=dev)

    # The live hypotheses of the n images still searching: n x K of them, flattened to n*K rows. What
    # depends on the image alone (the features, the decoder's image_state) stays one row per image,
    # serving its K rows: never copied K times, nor reordered.
    ids = torch.arange(B, device=dev)  # n: the images still searching
    state = {k: v if k in decoder.image_state else v.repeat_interleave(K, 0)
             for k, v in decoder.init_state(features).items()}  # n x ... or n*K x ...
    feats = features  # n x P x D
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
        _take_rows(state, rows, decoder.image_state)
        tokens = tokens.view(n * K, L)[rows].view(n, K, L)
        tokens[:, :, t] = word
        words = word.view(-1)

        # An image is done when even its best live hypothesis cannot overtake its best finished one.
        done = best_score[ids] >= score[:, 0] / float(L) ** penalty  # n
        if t == max_len or bool(done.all()):
            break
        if bool(done.any()):  # stopped images leave the batch
            keep = ~done
            images = torch.nonzero(keep).squeeze(1)  # n'
            rows = _rows_of(images, K)  # n'*K
            ids, score, tokens = ids[keep], score[keep], tokens[keep]
            state = {k: v.index_select(0, images if k in decoder.image_state else rows) for k, v in state.items()}
            feats, words = feats[keep], words[rows]
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


def _take_rows(state, rows, image_state):
    """Each hypothesis row of the state takes row rows[i]'s entries (n*K rows), in place and only where
    the row changes: most hypotheses extend themselves, and copying whole entries cost the Transformer,
    whose cache grows with every word, as much as its attention over the cells. The state is beam
    search's own: each step returns new tensors."""
    moved = torch.nonzero(rows != torch.arange(rows.numel(), device=rows.device)).squeeze(1)
    if moved.numel():
        source = rows[moved]
        for k, v in state.items():
            if k not in image_state:
                v.index_copy_(0, moved, v.index_select(0, source))


def _rows_of(images, K):
    """The hypothesis rows (n*K layout) of the images at the indices `images`."""
    return (images[:, None] * K + torch.arange(K, device=images.device)).view(-1)


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
