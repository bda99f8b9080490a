"""Self-critical training's parts: sampling through the step API, and the CIDEr-D reward."""
import random

import pytest
import torch

from datasets import Vocabulary
from metrics import CiderD
from models import AttentionDecoder, RNNDecoder, greedy, sample

V, P, D = 12, 4, 8
VOCAB = Vocabulary({**{f"w{i}": i for i in range(1, V - 3)}, "<pad>": 0, "<unk>": V - 3, "<start>": V - 2,
                    "<end>": V - 1})


def decoder(kind, seed=0):
    torch.manual_seed(seed)
    dec = RNNDecoder(V, D, emb_dim=8, decoder_dim=16) if kind == "rnn" else \
        AttentionDecoder(V, D, emb_dim=8, decoder_dim=16, attention_dim=8)
    with torch.no_grad():
        dec.fc.bias[VOCAB.end] += 1.5  # ends within a few words
    return dec.eval()


@pytest.mark.parametrize("kind", ["rnn", "attention"])
def test_sampling_near_zero_temperature_is_greedy(kind):
    dec, features = decoder(kind), torch.randn(6, P, D)
    out = sample(dec, features, VOCAB, samples=3, max_len=10, temperature=1e-6)
    ref = greedy(dec, features, VOCAB, max_len=10)
    for r in range(18):
        assert out.seqs[r, : out.lengths[r]].tolist() == ref.seqs[r // 3]
    torch.testing.assert_close(out.logprob.detach(), ref.scores.repeat_interleave(3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["rnn", "attention"])
def test_sampled_log_probabilities_are_the_teacher_forced_ones(kind):
    """The log-probability kept for each sample, <end> included, is what the teacher-forced forward
    gives the same caption, and the gradient reaches the decoder through it."""
    dec, features = decoder(kind, seed=1), torch.randn(4, P, D)
    torch.manual_seed(2)
    out = sample(dec, features, VOCAB, samples=5, max_len=6)
    assert out.ended.any() and out.lengths.max() <= 7
    captions = torch.cat([torch.full((20, 1), VOCAB.start), out.seqs], 1)  # <start> w1 ... <end> 0 ...
    logits, _ = dec(features.repeat_interleave(5, 0), captions, out.lengths + 1)
    logp = torch.log_softmax(logits, 2).gather(2, captions[:, 1:logits.size(1) + 1, None]).squeeze(2)
    mask = torch.arange(logits.size(1))[None] < out.lengths[:, None]
    torch.testing.assert_close(out.logprob, (logp * mask).sum(1), atol=1e-5, rtol=1e-5)
    out.logprob.sum().backward()
    assert dec.fc.weight.grad is not None and dec.fc.weight.grad.abs().sum() > 0
    for r in range(20):  # <end> last, nothing after it, never <pad> or <start>
        seq = out.seqs[r, : out.lengths[r]].tolist()
        assert seq[-1] == VOCAB.end and VOCAB.end not in seq[:-1] and VOCAB.start not in seq and 0 not in seq
        assert out.seqs[r, out.lengths[r]:].eq(0).all()


def test_cider_d_equals_pycocoevalcap():
    """With the scored set's references as the corpus, CIDEr-D equals coco-caption's Cider to 1e-6:
    repeated words, an empty caption and one longer than every reference included."""
    from pycocoevalcap.cider.cider import Cider
    rng = random.Random(0)
    words = "a b c d e f g h i j".split()
    refs = {i: [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(1, 6))]
            for i in range(40)}
    cands = {i: " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for i in refs}
    cands[0], cands[1], cands[2] = "a a a a a", "", " ".join(["b"] * 30)
    _, expected = Cider().compute_score(refs, {i: [c] for i, c in cands.items()})
    cider = CiderD([[r.split() for r in refs[i]] for i in refs])
    got = cider.score([cands[i].split() for i in refs], [[r.split() for r in refs[i]] for i in refs])
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-6
    ids = CiderD([[[words.index(w) for w in r.split()] for r in refs[i]] for i in refs])  # ids score as words
    assert ids.score([[words.index(w) for w in cands[3].split()]], [[[words.index(w) for w in r.split()]
                                                                    for r in refs[3]]])[0] == pytest.approx(got[3])
