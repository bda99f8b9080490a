"""Every decoder of the registry, untrained, held to the step API's contract (decoders.py) and to the
equivalences decoding relies on: forward == stepping, batched beam == one image at a time, beam 1 ==
greedy, a search's score == the teacher-forced log-probability. Then what the Transformer adds: its
key/value cache, its maps, its position table, and the config's refusals."""
import pytest
import torch

from config import merge_config
from datasets import Vocabulary
from decoders import expand
from decoding import DecodeOptions, _take_rows, beam_search, decode, greedy, sample
from models import DECODERS, TINY, ModelConfig, build_decoder, decoder_class
from objectives import caption_loss
from utils import InputError

V, D, P = 16, 24, 9  # words, feature width, cells (a 3 x 3 grid)
VOCAB = Vocabulary({**{f"w{i}": i for i in range(1, V - 3)}, "<pad>": 0, "<unk>": V - 3, "<start>": V - 2,
                    "<end>": V - 1})
SMALL = ModelConfig(**{**TINY, "encoded_size": 3, "transformer_positions": 24})  # a 3 x 3 grid
# Every decoder of the registry, and the attention LSTM's options (attention-maps.md) all on: every path of each
VARIANTS = {**{name: {"decoder": name} for name in DECODERS},
            "attention-variants": {"decoder": "attention", "attend_after_word": True, "attention_gate": False,
                                   "attention_cell_positions": True}}


def make(name, seed=0, dropout=0.0, end_bias=1.0):
    """An untrained decoder of the registry that ends its captions within a few words."""
    torch.manual_seed(seed)
    decoder = build_decoder(ModelConfig(**{**SMALL.__dict__, **VARIANTS[name]}), V, D, dropout)
    with torch.no_grad():
        decoder.fc.bias[VOCAB.end] += end_bias
    return decoder.eval()


def padded(lengths, seed=1, width=None):
    """Captions B x L of the given lengths (<start> and <end> counted), padded with 0."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    captions = torch.zeros(len(lengths), width or int(lengths.max()) + 2, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        captions[i, :n] = torch.randint(1, V - 3, (n,), generator=g)
        captions[i, 0] = VOCAB.start
    return captions, lengths


def features(n, seed=2):
    return torch.randn(n, P, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", VARIANTS)
def test_the_state_contract(name):
    """Every entry a tensor with the batch on dim 0; image entries untouched by a step; and all a step
    needs is in the state: permuting the rows of everything but the image's entries within an image
    (what beam search does) permutes the next step's output, with no position passed besides; and the
    image entries once per image serve the image's rows."""
    dec, K = make(name), 3
    feats = features(2).repeat_interleave(K, 0)  # 2 images x 3 hypotheses, image-major
    state = dec.init_state(feats)
    for t, words in enumerate(torch.randint(1, V - 3, (3, 6), generator=torch.Generator().manual_seed(3))):
        before = state
        _, state, _ = dec.step(words, state, feats)
        for key, value in state.items():
            assert isinstance(value, torch.Tensor) and value.size(0) == 6, (key, t)
        for key in dec.image_state:
            assert state[key] is before[key] or torch.equal(state[key], before[key])
    rows = torch.tensor([2, 0, 1, 4, 5, 3])  # moves within each image only
    moved = {k: v if k in dec.image_state else v[rows] for k, v in state.items()}
    words = torch.tensor([1, 2, 3, 4, 5, 6])
    logits, _, alpha = dec.step(words[rows], moved, feats)
    expected, _, expected_alpha = dec.step(words, state, feats)
    torch.testing.assert_close(logits, expected[rows])
    if dec.returns_maps:
        torch.testing.assert_close(alpha, expected_alpha[rows])
    # the image entries and the features once per image (beam search's layout) step as the copies do
    once = {k: v[::K] if k in dec.image_state else v for k, v in state.items()}
    logits, _, alpha = dec.step(words, once, feats[::K])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-5)
    if dec.returns_maps:
        torch.testing.assert_close(alpha, expected_alpha, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_beam_reorders_in_place_as_copying_would(name):
    """Beam search moves only the rows whose parent is another row, in place: the state it leaves is
    the copy by index of every row, and the image entries are untouched."""
    dec, K = make(name), 3
    with torch.no_grad():
        state = expand(dec.init_state(features(2)), K, keep=dec.image_state)
        for words in torch.randint(1, V - 3, (4, 2 * K), generator=torch.Generator().manual_seed(5)):
            _, state, _ = dec.step(words, state, features(2))
    rows = torch.tensor([0, 0, 1, 5, 3, 3])  # image 0: two from beam 0; image 1: a cycle and a copy
    copied = {k: v if k in dec.image_state else v[rows] for k, v in state.items()}
    _take_rows(state, rows, dec.image_state)
    assert state.keys() == copied.keys() and all(torch.equal(state[k], copied[k]) for k in state)


@pytest.mark.parametrize("name", VARIANTS)
def test_forward_equals_stepping_with_padding(name):
    """The teacher-forced logits and maps are the stepped ones, for captions of different lengths
    (one of length 2: <start> and <end>) padded in one batch; maps are distributions."""
    dec = make(name)
    captions, lengths = padded([2, 9, 5, 12, 3])
    feats = features(5)
    with torch.no_grad():
        logits, maps = dec(feats, captions, lengths)
        state = dec.init_state(feats)
        for t in range(logits.size(1)):
            step_logits, state, alpha = dec.step(captions[:, t], state, feats)
            torch.testing.assert_close(step_logits, logits[:, t], atol=1e-5, rtol=1e-5)
            if dec.returns_maps:
                torch.testing.assert_close(alpha, maps[:, t], atol=1e-6, rtol=1e-5)
    assert torch.isfinite(logits).all()
    if dec.returns_maps:
        assert maps.shape == (5, logits.size(1), P)
        torch.testing.assert_close(maps.sum(2), torch.ones(5, logits.size(1)))
    else:
        assert maps is None
    with torch.no_grad():  # training without the maps (where they cost work): the same logits
        unmapped, none = dec(feats, captions, lengths, maps=False)
    torch.testing.assert_close(unmapped, logits, atol=1e-5, rtol=1e-5)
    assert (none is None) == (dec.maps_cost or not dec.returns_maps)


@pytest.mark.parametrize("name", VARIANTS)
def test_grouped_forward_equals_repeated_images(name):
    """k captions per image (group_by_image): the image's work once gives the logits of repeating it
    (in eval mode; the plain decoder's training-mode BatchNorm is tested in test_models.py)."""
    dec, images = make(name), features(2)
    captions, lengths = padded([4, 7, 3, 9, 2, 5])
    grouped, gm = dec(images, captions, lengths)
    repeated, rm = dec(images.repeat_interleave(3, 0), captions, lengths)
    torch.testing.assert_close(grouped, repeated, atol=1e-5, rtol=1e-5)
    if dec.returns_maps:
        torch.testing.assert_close(gm, rm, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("beam_size", [3, 5])
def test_batched_beam_equals_one_image_at_a_time(name, beam_size):
    dec, feats = make(name, end_bias=0.5), features(6)
    options = DecodeOptions(beam_size, max_len=12)
    batched = beam_search(dec, feats, VOCAB, options)
    for i in range(len(feats)):
        single = beam_search(dec, feats[i:i + 1], VOCAB, options)
        assert single.seqs[0] == batched.seqs[i]
        torch.testing.assert_close(single.scores[0], batched.scores[i], atol=1e-5, rtol=1e-5)
        if dec.returns_maps:
            torch.testing.assert_close(single.alphas[0], batched.alphas[i], atol=1e-5, rtol=1e-4)
            assert batched.alphas[i].shape == (len(batched.seqs[i]), P)
            torch.testing.assert_close(batched.alphas[i].sum(1), torch.ones(len(batched.seqs[i])))
        else:
            assert batched.alphas is None


@pytest.mark.parametrize("name", VARIANTS)
def test_beam_one_is_greedy(name):
    dec, feats = make(name, end_bias=0.5), features(6)
    g = greedy(dec, feats, VOCAB, max_len=12)
    b = beam_search(dec, feats, VOCAB, DecodeOptions(beam_size=1, max_len=12))
    assert g.seqs == b.seqs
    torch.testing.assert_close(g.scores, b.scores, atol=1e-5, rtol=1e-5)
    if dec.returns_maps:
        for x, y in zip(g.alphas, b.alphas, strict=True):
            torch.testing.assert_close(x, y)


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("beam_size", [1, 4])
def test_score_is_the_teacher_forced_log_probability(name, beam_size):
    dec, feats = make(name, end_bias=0.5), features(6)
    out = beam_search(dec, feats, VOCAB, DecodeOptions(beam_size, max_len=12))
    for i, seq in enumerate(out.seqs):
        caption = torch.tensor([[VOCAB.start] + seq])
        with torch.no_grad():
            logits, _ = dec(feats[i:i + 1], caption, torch.tensor([len(seq) + 1]))
        logp = torch.log_softmax(logits[0], dim=1).gather(1, caption[0, 1:, None]).sum()
        torch.testing.assert_close(logp, out.scores[i], atol=1e-4, rtol=1e-5)


# ----------------------------------------------------------------------------- the Transformer

def test_transformer_cache_equals_recomputing_the_prefix():
    """Each cached step gives the logits of running the whole prefix again, without a cache."""
    dec = make("transformer")
    captions, lengths = padded([10, 10, 10, 10])
    feats = features(4)
    with torch.no_grad():
        state = dec.init_state(feats)
        for t in range(9):
            cached, state, alpha = dec.step(captions[:, t], state, feats)
            whole, maps = dec(feats, captions[:, : t + 2], torch.full((4,), t + 2))
            torch.testing.assert_close(cached, whole[:, t], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(alpha, maps[:, t], atol=1e-6, rtol=1e-5)
            assert state["cache0"].shape[2] == t + 1  # one more word in the cache per step


def test_transformer_trains_without_nan_on_short_captions():
    """In training mode (dropout on), with a caption of length 2 in the batch, the loss and every
    gradient are finite, and every parameter gets one."""
    dec = make("transformer", dropout=0.1).train()
    captions, lengths = padded([2, 2, 6, 3])
    logits, maps = dec(features(4), captions, lengths)
    loss = caption_loss(logits, maps, captions, lengths).loss
    loss.backward()
    assert torch.isfinite(loss)
    for name, p in dec.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_transformer_map_layer_and_positions():
    """The maps come from the chosen layer; the position table bounds both training and decoding."""
    dec = make("transformer")
    captions, lengths = padded([5, 7])
    assert dec.map_layer is None  # the mean of the layers' maps, by default
    mean = dec(features(2), captions, lengths)[1]
    dec.map_layer = 0
    first = dec(features(2), captions, lengths)[1]
    dec.map_layer = -1
    last = dec(features(2), captions, lengths)[1]
    assert not torch.allclose(first, last)
    torch.testing.assert_close(mean, (first + last) / 2)
    assert dec.max_len == 23  # 24 positions: 23 words and <end>
    decode(dec, features(1), VOCAB, DecodeOptions(max_len=23))
    with pytest.raises(InputError, match="^max_len=24 is more .* transformer_positions allow 23 words.*max_len=23 or"):
        decode(dec, features(1), VOCAB, DecodeOptions(beam_size=3, max_len=24))
    # every search checks, whatever path reached it (eval.py's benchmark calls beam_search itself), and says
    # the option as the user typed it
    for search in (lambda: beam_search(dec, features(1), VOCAB, DecodeOptions(3, 24, max_len_name="--max-len")),
                   lambda: greedy(dec, features(1), VOCAB, 24, "--max-len"),
                   lambda: sample(dec, features(1), VOCAB, 2, max_len=24)):
        with pytest.raises(InputError, match="^(--max-len|scst_max_len) 24 is more words"):
            search()
    long, long_lengths = padded([26])
    with pytest.raises(InputError, match="needs 25 word positions, but transformer_positions is 24"):
        dec(features(1), long, long_lengths)


def test_the_config_asks_the_decoder_class():
    from config import default_config
    cfg = default_config()
    with pytest.raises(InputError, match=f"unknown decoder 'lstm': use {', '.join(DECODERS)}$"):
        decoder_class("lstm")
    with pytest.raises(InputError, match=f"decoder must be one of {', '.join(DECODERS)}, got 'lstm'"):
        merge_config(cfg, {"decoder": "lstm"}, "test")
    for name in ("rnn", "transformer"):
        with pytest.raises(InputError, match=f"only the attention decoder does; the {name} decoder takes attention"):
            decoder_class(name).check_config(dict(cfg, decoder=name, attention="hard"))
    decoder_class("attention").check_config(dict(cfg, attention="hard"))
    with pytest.raises(InputError, match="max_decode_len 80 needs 81 word positions.*transformer_positions is 64"):
        decoder_class("transformer").check_config(dict(cfg, decoder="transformer", max_decode_len=80))
    with pytest.raises(InputError, match="transformer_dim 100 must be a multiple of transformer_heads 8"):
        decoder_class("transformer").check_config(dict(cfg, decoder="transformer", transformer_dim=100))
    assert ModelConfig() == ModelConfig.of(cfg)  # a field a checkpoint lacks takes default.yaml's value
