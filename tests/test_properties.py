"""Property-based tests (hypothesis): the caption encode/decode round trip, and what every decoded
caption must look like whatever the model, the beam size and the length limit."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from create_input_files import build_word_map
from datasets import Vocabulary
from decoding import DecodeOptions, decode
from models import DECODERS, TINY, ModelConfig, build_decoder

words = st.text(alphabet="abcdefgh", min_size=1, max_size=4)
captions = st.lists(st.lists(words, min_size=1, max_size=12), min_size=1, max_size=20)


@settings(max_examples=200, deadline=None)
@given(captions=captions, caption=st.lists(words, max_size=15), min_word_freq=st.integers(0, 2))
def test_encode_then_decode_gives_the_words_back(captions, caption, min_word_freq):
    word_map = build_word_map(captions, min_word_freq)
    vocab = Vocabulary(word_map)
    assert sorted(word_map.values()) == list(range(len(word_map)))  # ids are dense, <pad> = 0
    ids = vocab.encode(caption, max_len=15)
    assert len(ids) == 17 and ids[0] == word_map["<start>"] and ids[len(caption) + 1] == word_map["<end>"]
    assert vocab.decode(ids) == [w if w in word_map else "<unk>" for w in caption]


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(list(DECODERS)), seed=st.integers(0, 2**16), beam=st.integers(1, 4),
       max_len=st.integers(1, 8), batch=st.integers(1, 3), end_bias=st.floats(-4, 6))
def test_decoded_captions_end_in_end_or_stop_at_max_len(kind, seed, beam, max_len, batch, end_bias):
    torch.manual_seed(seed)
    vocab, cells, dim = 12, 4, 8
    word_map = {**{f"w{i}": i for i in range(1, vocab - 3)}, "<pad>": 0, "<unk>": vocab - 3, "<start>": vocab - 2,
                "<end>": vocab - 1}
    model = ModelConfig(**{**TINY, "decoder": kind, "encoded_size": 2, "transformer_positions": 10})
    decoder = build_decoder(model, vocab, dim).eval()
    with torch.no_grad():
        decoder.fc.bias[word_map["<end>"]] += end_bias  # from "never ends" to "ends at once"
    out = decode(decoder, torch.randn(batch, cells, dim), Vocabulary(word_map), DecodeOptions(beam, max_len))
    end = word_map["<end>"]
    assert len(out.seqs) == batch and torch.isfinite(out.scores).all()
    for i, seq in enumerate(out.seqs):
        assert 1 <= len(seq) <= max_len + 1 and seq[-1] == end and end not in seq[:-1]
        assert word_map["<start>"] not in seq and 0 not in seq
        if decoder.returns_maps:
            assert out.alphas[i].shape == (len(seq), cells)
            assert torch.allclose(out.alphas[i].sum(1), torch.ones(len(seq)), atol=1e-5)
