"""Decoding with trained models: captions end, batched beam search == one image at a time with a
length penalty, n-gram blocking, max_len; sampling for self-critical training, for every decoder.
(test_decoders.py holds every decoder to the search's equivalences on untrained ones.)"""
import pytest
import torch

from datasets import CaptionDataset, Vocabulary
from decoding import DecodeOptions, beam_search, decode, greedy, sample
from checkpoint import load_trained
from models import DECODERS
from tests.test_decoders import VOCAB, D, P, make
from tests.helpers import SHAPES_NAME


@pytest.fixture(scope="module", params=["rnn", "attention"])
def model(request, trained, shapes_data):
    ckpt, encoder, decoder, _ = load_trained(trained(request.param), torch.device("cpu"))
    images = torch.stack([CaptionDataset(shapes_data, SHAPES_NAME, split)[i].image
                          for split in ("VAL", "TEST") for i in range(6)])
    with torch.no_grad():
        features = encoder(images)
    return decoder, features, Vocabulary(ckpt["word_map"]), request.param


def test_trained_model_ends_its_captions(model):
    decoder, features, word_map, _ = model
    out = greedy(decoder, features, word_map, max_len=20)
    assert sum(len(s) < 21 for s in out.seqs) >= 10  # most end on their own, before the cut-off
    assert all(s[-1] == word_map.end and word_map.end not in s[:-1] for s in out.seqs)


@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_batched_equals_one_at_a_time_on_a_trained_model(model, length_penalty):
    """The search of test_decoders.py on captions a trained model ends by itself, with a length penalty."""
    decoder, features, word_map, kind = model
    options = DecodeOptions(5, max_len=20, length_penalty=length_penalty)
    batched = beam_search(decoder, features, word_map, options)
    for i in range(len(features)):
        single = beam_search(decoder, features[i:i + 1], word_map, options)
        assert single.seqs[0] == batched.seqs[i]
        torch.testing.assert_close(single.scores[0], batched.scores[i], atol=1e-5, rtol=1e-5)


def test_ngram_blocking_and_max_len(model):
    decoder, features, word_map, _ = model
    out = decode(decoder, features, word_map, DecodeOptions(beam_size=3, max_len=20, block_ngram_repeat=2))
    for s in out.seqs:
        bigrams = list(zip([word_map.start] + s[:-1], s, strict=True))
        assert len(bigrams) == len(set(bigrams))
    short = decode(decoder, features, word_map, DecodeOptions(beam_size=3, max_len=3))
    assert all(1 <= len(s) <= 4 and s[-1] == word_map.end for s in short.seqs)


# ----------------------------------------------------------------------------- sampling

def decoder(kind, seed=0):
    return make(kind, seed, end_bias=1.5)  # ends within a few words


@pytest.mark.parametrize("kind", DECODERS)
def test_sampling_near_zero_temperature_is_greedy(kind):
    dec, features = decoder(kind), torch.randn(6, P, D)
    out = sample(dec, features, VOCAB, samples=3, max_len=10, temperature=1e-6)
    ref = greedy(dec, features, VOCAB, max_len=10)
    for r in range(18):
        assert out.seqs[r, : out.lengths[r]].tolist() == ref.seqs[r // 3]
    torch.testing.assert_close(out.logprob.detach(), ref.scores.repeat_interleave(3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", DECODERS)
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
