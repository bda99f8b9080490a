"""Batched beam search == one image at a time; beam 1 == greedy; n-gram blocking; max_len."""
import pytest
import torch

from datasets import CaptionDataset, Vocabulary
from models import DecodeOptions, beam_search, decode, greedy, load_model
from tests.conftest import SHAPES_NAME
from utils import load_checkpoint


@pytest.fixture(scope="module", params=["rnn", "attention"])
def model(request, trained, shapes_data):
    ckpt = load_checkpoint(trained(request.param))
    encoder, decoder = load_model(ckpt, torch.device("cpu"))
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


@pytest.mark.parametrize("beam_size", [3, 5])
@pytest.mark.parametrize("length_penalty", [0.0, 0.7])
def test_batched_equals_one_at_a_time(model, beam_size, length_penalty):
    decoder, features, word_map, kind = model
    options = DecodeOptions(beam_size, max_len=20, length_penalty=length_penalty)
    batched = beam_search(decoder, features, word_map, options)
    for i in range(len(features)):
        single = beam_search(decoder, features[i:i + 1], word_map, options)
        assert single.seqs[0] == batched.seqs[i]
        torch.testing.assert_close(single.scores[0], batched.scores[i], atol=1e-5, rtol=1e-5)
        if kind == "attention":
            torch.testing.assert_close(single.alphas[0], batched.alphas[i], atol=1e-5, rtol=1e-4)
            assert batched.alphas[i].shape == (len(batched.seqs[i]), features.size(1))
        else:
            assert batched.alphas is None


def test_beam_one_is_greedy(model):
    decoder, features, word_map, kind = model
    g = greedy(decoder, features, word_map, max_len=20)
    b = beam_search(decoder, features, word_map, DecodeOptions(beam_size=1, max_len=20))
    assert g.seqs == b.seqs
    torch.testing.assert_close(g.scores, b.scores, atol=1e-5, rtol=1e-5)
    if kind == "attention":
        for x, y in zip(g.alphas, b.alphas, strict=True):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("beam_size", [1, 4])
def test_scores_are_the_log_probability_of_the_caption(model, beam_size):
    """Rescoring each returned caption with the teacher-forced forward gives the search's score."""
    decoder, features, word_map, _ = model
    out = beam_search(decoder, features, word_map, DecodeOptions(beam_size, max_len=20))
    for i, seq in enumerate(out.seqs):
        caption = torch.tensor([[word_map.start] + seq])
        logits, _ = decoder(features[i:i + 1], caption, torch.tensor([len(seq) + 1]))
        logp = torch.log_softmax(logits[0], dim=1).gather(1, caption[0, 1:, None]).sum()
        torch.testing.assert_close(logp, out.scores[i], atol=1e-4, rtol=1e-5)


def test_ngram_blocking_and_max_len(model):
    decoder, features, word_map, _ = model
    out = decode(decoder, features, word_map, DecodeOptions(beam_size=3, max_len=20, block_ngram_repeat=2))
    for s in out.seqs:
        bigrams = list(zip([word_map.start] + s[:-1], s, strict=True))
        assert len(bigrams) == len(set(bigrams))
    short = decode(decoder, features, word_map, DecodeOptions(beam_size=3, max_len=3))
    assert all(1 <= len(s) <= 4 and s[-1] == word_map.end for s in short.seqs)
