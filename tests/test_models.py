"""Encoder and decoders: attention, loss, accumulation, weights files (test_decoders.py: forward == stepping)."""
import pytest
import torch

from decoders import AttentionDecoder, RNNDecoder
from encoder import Encoder, load_resnet
from objectives import caption_loss
from utils import InputError

V, D, P, B = 30, 24, 9, 6


def make(kind, dropout=0.0):
    torch.manual_seed(0)
    if kind == "attention":
        return AttentionDecoder(V, D, emb_dim=12, decoder_dim=20, attention_dim=10, dropout=dropout)
    return RNNDecoder(V, D, emb_dim=12, decoder_dim=20, dropout=dropout)


def batch(b=B, length=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, P, D, generator=g)
    lengths = torch.randint(3, length + 1, (b,), generator=g)
    captions = torch.zeros(b, length + 2, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        captions[i, :n] = torch.randint(1, V, (n,), generator=g)
    return features, captions, lengths


def test_doubly_stochastic_term_matches_formula():
    dec = make("attention").eval()
    features, captions, lengths = batch()
    logits, alphas = dec(features, captions, lengths)
    with_reg, ce_sum, _, tokens = caption_loss(logits, alphas, captions, lengths, alpha_c=1.0)
    without, *_ = caption_loss(logits, alphas, captions, lengths, alpha_c=0.0)
    expected = 0.0
    for i in range(B):  # by hand: only the steps that produce a real token count
        steps = int(lengths[i]) - 1
        expected += ((1 - alphas[i, :steps].sum(0)) ** 2).sum()
    expected /= B * P
    torch.testing.assert_close(with_reg - without, expected)
    torch.testing.assert_close(without, ce_sum / tokens)
    assert int(tokens) == int((lengths - 1).sum())


@pytest.mark.parametrize("kind", ["rnn", "attention"])
def test_padding_does_not_change_the_loss(kind):
    dec = make(kind).eval()
    features, captions, lengths = batch()
    logits, alphas = dec(features, captions, lengths)
    loss, *_ = caption_loss(logits, alphas, captions, lengths, alpha_c=1.0)
    longer = torch.cat([captions, torch.zeros(B, 7, dtype=torch.long)], 1)  # more padding ...
    noisy = longer.clone()
    for i, n in enumerate(lengths.tolist()):
        noisy[i, n:] = torch.randint(1, V, (longer.size(1) - n,))  # ... or junk where padding is
    for caps in (longer, noisy):
        logits2, alphas2 = dec(features, caps, lengths)
        loss2, *_ = caption_loss(logits2, alphas2, caps, lengths, alpha_c=1.0)
        torch.testing.assert_close(loss, loss2)


def grads(dec):
    return torch.cat([p.grad.flatten() for p in dec.parameters() if p.grad is not None])


def test_accumulation_equals_one_big_batch():
    """Two micro-batches of 16, normalised by the whole step's tokens, give the gradient of one 32."""
    features, captions, lengths = batch(32, seed=5)
    dec = make("attention")  # dropout 0: the train-mode forward is deterministic
    loss, *_ = caption_loss(*dec(features, captions, lengths), captions, lengths, alpha_c=1.0)
    loss.backward()
    big = grads(dec)
    dec.zero_grad()
    tokens = int((lengths - 1).sum())
    for part in (slice(0, 16), slice(16, 32)):
        f, c, n = features[part], captions[part], lengths[part]
        loss, *_ = caption_loss(*dec(f, c, n), c, n, alpha_c=1.0, norm_tokens=tokens, norm_images=32)
        loss.backward()
    torch.testing.assert_close(grads(dec), big, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["rnn", "attention"])
def test_grouped_forward_equals_the_forward_of_repeated_images(kind):
    """group_by_image: the initial state and the attention projection once per image, for its k
    captions, give the logits, maps and loss of feeding each image once per caption; in training
    mode too (BatchNorm over the distinct images has the statistics of the repeated ones)."""
    dec = make(kind).train()
    features, captions, lengths = batch(12, seed=7)
    images = features[::3]  # 4 images, 3 captions each
    grouped, grouped_alphas = dec(images, captions, lengths)
    repeated, repeated_alphas = dec(images.repeat_interleave(3, 0), captions, lengths)
    torch.testing.assert_close(grouped, repeated, atol=1e-5, rtol=1e-5)
    if kind == "attention":
        torch.testing.assert_close(grouped_alphas, repeated_alphas, atol=1e-6, rtol=1e-5)
    a = caption_loss(grouped, grouped_alphas, captions, lengths, alpha_c=1.0)
    b = caption_loss(repeated, repeated_alphas, captions, lengths, alpha_c=1.0)
    torch.testing.assert_close(a.loss, b.loss)
    assert int(a.tokens) == int(b.tokens) == int((lengths - 1).sum())  # the loss stays per token


def test_grouped_accumulation_equals_one_big_batch():
    """The objective on grouped micro-batches (2 x 4 images x 4 captions) of cached grids, normalised
    by the whole step, gives the gradient of one batch of 8 images x 4 captions."""
    from datasets import TrainItem
    from objectives import CrossEntropy, Step
    _, captions, lengths = batch(32, seed=9)
    encoder = Encoder("resnet18", "none", encoded_size=3, stages=1)  # 64 channels
    torch.manual_seed(0)
    decoder = AttentionDecoder(V, encoder.dim, emb_dim=12, decoder_dim=20, attention_dim=10, dropout=0.0)
    objective = CrossEntropy(encoder, decoder, {"decoder": "attention", "alpha_c": 1.0})
    grids = torch.randn(8, 64, 3, 3).half()  # as the feature cache hands them over
    norm = Step(int((lengths - 1).sum()), 32)
    whole = TrainItem(grids, captions.view(8, 4, -1), lengths.view(8, 4), torch.arange(8))
    objective(whole, norm)[0].backward()
    big = grads(decoder)
    decoder.zero_grad()
    for part in (slice(0, 4), slice(4, 8)):
        objective(TrainItem(*(t[part] for t in whole)), norm)[0].backward()
    torch.testing.assert_close(grads(decoder), big, atol=1e-6, rtol=1e-5)


def test_encoder_shapes_fine_tune_and_frozen_batchnorm():
    enc = Encoder("resnet18", "none", encoded_size=3, stages=2)
    assert enc.dim == 128 and enc.frozen
    images = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    assert enc(images).shape == (2, 9, 128)
    enc.fine_tune(True)
    trainable = {n.split(".")[1] for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable == {"layer2"}  # of conv1, bn1, relu, maxpool, layer1, layer2
    enc.train()
    stem_bn = enc.net[1]
    assert not stem_bn.training and enc.net[5].training
    before = stem_bn.running_mean.clone()
    enc(images)
    assert torch.equal(before, stem_bn.running_mean)  # frozen BatchNorm statistics do not move
    assert Encoder("resnet101", "none", stages=4).dim == 2048


def test_weights_from_a_file(tmp_path):
    net, _ = load_resnet("resnet18", "none")
    state = {k: v for k, v in net.state_dict().items() if not k.startswith(("fc.", "layer3.", "layer4."))}
    torch.save(state, tmp_path / "trunk.pt")
    enc = Encoder("resnet18", str(tmp_path / "trunk.pt"), encoded_size=2, stages=2)
    torch.testing.assert_close(enc.net.conv1.weight, net.conv1.weight)
    assert set(enc.net.state_dict()) == set(state)  # the trunk's state_dict is a ResNet state_dict
    with pytest.raises(InputError, match="lacks weights"):
        Encoder("resnet18", str(tmp_path / "trunk.pt"), encoded_size=2, stages=3)
    with pytest.raises(InputError, match="not found"):
        Encoder("resnet18", str(tmp_path / "missing.pt"))
    with pytest.raises(InputError, match="unknown encoder"):
        Encoder("vgg16", "none")


def test_imagenet_download_failure_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # nothing cached, and no internet here

    def offline(*a, **k):
        raise OSError("network is unreachable")
    import torchvision.models._api as api
    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(InputError) as e:
        Encoder("resnet101", "imagenet")
    msg = str(e.value)
    assert "resnet101-63fe2227.pth" in msg and "sha256 starting 63fe2227" in msg and "--encoder_weights" in msg


@pytest.mark.parametrize("encoded_size", [2, 8])
def test_cached_grid_gives_the_features_of_the_images(encoded_size):
    """The feature cache keeps the trunk's 4 x 4 grid (encoded_size 8: pooling would spread it over 64
    cells) or the pooled one where that is smaller (2 x 2); head() of it, read back in float16, is the
    encoder's output to float16 rounding."""
    enc = Encoder("resnet18", "none", encoded_size=encoded_size, stages=2, coords=True).eval()
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        grid = enc.cache_grid(images)
        assert grid.shape == (3, 128, min(4, encoded_size), min(4, encoded_size))
        from_cache = enc.head(grid.half().float())
        direct = enc(images)
    assert from_cache.shape == direct.shape == (3, encoded_size ** 2, 130)
    torch.testing.assert_close(from_cache, direct, atol=2e-3, rtol=1e-3)  # float16 keeps 11 bits
    torch.testing.assert_close(from_cache, direct.half().float(), atol=2e-3, rtol=1e-3)


def test_label_smoothing_changes_the_loss_not_the_reported_cross_entropy():
    dec = make("rnn").eval()
    features, captions, lengths = batch()
    logits, _ = dec(features, captions, lengths)
    plain = caption_loss(logits, None, captions, lengths)
    smooth = caption_loss(logits, None, captions, lengths, label_smoothing=0.1)
    T = logits.size(1)
    mask = torch.arange(T)[None] < (lengths - 1)[:, None]
    expected = torch.nn.functional.cross_entropy(logits[mask], captions[:, 1:T + 1][mask], label_smoothing=0.1)
    torch.testing.assert_close(smooth.loss, expected)
    torch.testing.assert_close(smooth.ce_sum, plain.ce_sum)
    assert not torch.isclose(smooth.loss, plain.loss)
