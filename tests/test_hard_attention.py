"""Hard attention (Xu et al. 2015, section 4.1): the draws, the estimators' gradients, and decoding."""
import itertools
import math

import pytest
import torch
from scipy import stats

from datasets import TrainItem, Vocabulary
from decoding import DecodeOptions, beam_search, greedy
from decoders import ARGMAX, AttentionDecoder, HardNoise
from objectives import caption_loss
from objectives import CrossEntropy, HardAttention, Step

V, P, D = 10, 3, 6
VOCAB = Vocabulary({**{f"w{i}": i for i in range(1, V - 3)}, "<pad>": 0, "<unk>": V - 3, "<start>": V - 2,
                    "<end>": V - 1})
CFG = {"decoder": "attention", "alpha_c": 0.0, "hard_estimator": "reinforce", "hard_samples": 2,
       "hard_sample_p": 1.0, "hard_lambda_r": 1.0, "hard_lambda_e": 0.0, "hard_tau": 1.0}


def decoder(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return AttentionDecoder(V, D, emb_dim=4, decoder_dim=8, attention_dim=5, dropout=dropout).double()


class Cached:
    """Stands in for the encoder: the batches hold the decoders' features already, in double precision."""
    frozen = True

    @staticmethod
    def head(x):
        return x.double()


def objective(dec, **cfg):
    return HardAttention(Cached(), dec, {**CFG, **cfg})


def toy(b=1, length=2, seed=3):
    """b captions of `length` words (T = length + 1 steps with <end>), features b x P x D."""
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(b, P, D, generator=g).double()  # float32 values: the objective reads them as float
    captions = torch.zeros(b, length + 3, dtype=torch.long)
    captions[:, 0] = VOCAB.start
    captions[:, 1:length + 1] = torch.randint(1, V - 3, (b, length), generator=g)
    captions[:, length + 1] = VOCAB.end
    return features, captions, torch.full((b,), length + 2)


def grads(module):
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel(), dtype=p.dtype)
                      for p in module.parameters()])


def test_with_no_draws_and_no_entropy_it_is_soft_attention():
    """hard_sample_p 0 and lambda_e 0: the loss and every gradient are the soft decoder's."""
    features, captions, lengths = toy(4, 5)
    batch = TrainItem(features, captions, lengths, torch.arange(4))
    step = Step(int((lengths - 1).sum()), 4, seed=1)
    soft_dec, hard_dec = decoder(), decoder()
    soft = CrossEntropy(Cached(), soft_dec, {"decoder": "attention", "alpha_c": 1.0})
    hard = objective(hard_dec, hard_sample_p=0.0, hard_lambda_e=0.0, alpha_c=1.0)
    a, b = soft(batch, step)[0], hard(batch, step)[0]
    a.backward()
    b.backward()
    torch.testing.assert_close(a.double(), b.double())
    torch.testing.assert_close(grads(soft_dec), grads(hard_dec))


def test_drawn_contexts_are_exactly_the_cells_and_follow_alpha():
    dec = decoder()
    features = torch.randn(1, P, D, dtype=torch.float64).expand(20000, -1, -1)
    state = dec.init_state(features)
    gumbel = -torch.log(-torch.log(torch.rand(20000, P, dtype=torch.float64)))
    pick = HardNoise(gumbel, torch.ones(20000, dtype=bool))  # one step: B x P
    context, alpha, cells = dec.attention(features, state["proj"], state["h"], pick)
    assert torch.equal(context, features[torch.arange(20000), cells])  # a[s], not a mixture
    counts = torch.bincount(cells, minlength=P).numpy()
    assert stats.chisquare(counts, alpha[0].detach().numpy() * 20000).pvalue > 1e-3
    _, one_hot, best = dec.attention(features[:1], state["proj"][:1], state["h"][:1], ARGMAX)
    assert torch.equal(one_hot[0], torch.nn.functional.one_hot(alpha[0].argmax(), P).double())


def exact_gradient(dec, features, captions, lengths):
    """The gradient of E_s[sum_t -log p(y_t | s, a)] / tokens, enumerating all P^T cell sequences, and
    that expected cost."""
    T = int(lengths[0]) - 1
    dec.zero_grad()
    total = 0.0
    for cells in itertools.product(range(P), repeat=T):
        forced = torch.full((1, T, P), -1e9, dtype=torch.float64)
        forced[0, torch.arange(T), list(cells)] = 0.0  # the Gumbel-max picks exactly these cells
        logits, alphas, picked = dec(features, captions, lengths, HardNoise(forced, torch.ones(1, dtype=bool)))
        assert picked[0].tolist() == list(cells)
        p = alphas[0, torch.arange(T), list(cells)].prod()  # p(s | a), each step's alpha given the cells before
        nll = caption_loss(logits, None, captions, lengths).loss * T  # the summed cross-entropy, with its graph
        total = total + p * nll
    (total / T).backward()
    return grads(dec), float(total.detach())


@pytest.mark.parametrize("baseline", [0.0, -2.0, "expected"])
@pytest.mark.slow  # over 5 s alone: make test only
def test_the_reinforce_gradient_is_unbiased_for_any_constant_baseline(baseline):
    """T = 2 words + <end> = 3 steps over 3 cells: the mean of the estimator's gradient over 800,000
    draws (400 batches of 2,000 copies of the caption, each row drawing its own cells) matches the
    exact gradient of the expected cost, summed over the 27 cell sequences, within its confidence
    interval; and that interval is narrow enough to tell the attention's gradient from zero."""
    features, captions, lengths = toy(1, 2)
    dec = decoder(seed=11)
    with torch.no_grad():
        dec.attention.full_att.weight.mul_(3)  # a sharper attention: the cells' draws matter more
    exact, expected = exact_gradient(dec, 3 * features, captions, lengths)
    baseline = expected if baseline == "expected" else baseline
    obj, rows = objective(dec), 2000
    batch = TrainItem((3 * features).expand(rows, -1, -1), captions.expand(rows, -1), lengths.expand(rows),
                      torch.arange(rows))
    means = []
    for seed in range(400):
        obj.baseline.fill_(baseline)  # a constant: the moving average is held still
        dec.zero_grad()
        obj(batch, Step(rows * (int(lengths[0]) - 1), rows, seed=seed))[0].backward()
        means.append(grads(dec))
    means = torch.stack(means)
    mean, error = means.mean(0), means.std(0) / math.sqrt(len(means))
    # softmax ignores full_att's bias: its gradient is 0, each draw's only rounding, so its error ~ 0 too
    ignored = torch.cat([torch.full((p.numel(),), name == "attention.full_att.bias")
                         for name, p in dec.named_parameters()])
    z = ((mean - exact).abs() / (error + 1e-12))[~ignored]
    assert z.max() < 4.5 and exact[ignored].abs().max() < 1e-6, z.max()
    attention = slice(0, sum(p.numel() for p in dec.attention.parameters()) - 1)
    if baseline == expected:  # the least noisy baseline: a wrong REINFORCE term would show
        assert (exact[attention].abs() / error[attention]).max() > 5


@pytest.mark.slow  # over 5 s alone: make test only
def test_the_moving_average_baseline_lowers_the_variance():
    features, captions, lengths = toy(1, 2)
    batch = TrainItem(features, captions, lengths, torch.arange(1))
    spread = {}
    for name, held in (("none", 0.0), ("moving", None)):
        dec = decoder(seed=5)
        obj = objective(dec)
        draws = []
        for seed in range(1500):
            if held is not None:
                obj.baseline.fill_(held)
            dec.zero_grad()
            obj(batch, Step(int(lengths[0]) - 1, 1, seed=seed))[0].backward()
            draws.append(grads(dec))
        spread[name] = torch.stack(draws)[200:].var(0).sum()  # after the average has settled
    assert spread["moving"] < 0.5 * spread["none"], spread


def test_the_cell_with_the_lower_loss_gains_weight():
    """A bandit: of three cells, one gives the caption the lowest cost; REINFORCE alone (a drawn cell
    gives the attention parameters no likelihood gradient) moves alpha onto it."""
    dec = decoder(seed=2)
    features = 3 * torch.randn(1, P, D, generator=torch.Generator().manual_seed(8)).double()
    captions, lengths = torch.tensor([[VOCAB.start, 1, 2, VOCAB.end, 0]]), torch.tensor([4])
    costs = []
    for cell in range(P):
        forced = torch.full((1, 3, P), -1e9, dtype=torch.float64)
        forced[..., cell] = 0.0
        logits, _, _ = dec(features, captions, lengths, HardNoise(forced, torch.ones(1, dtype=bool)))
        costs.append(float(caption_loss(logits, None, captions, lengths).loss.detach()))
    best = min(range(P), key=costs.__getitem__)
    assert max(costs) - min(costs) > 0.05, costs
    for p in dec.parameters():
        p.requires_grad_(False)
    for p in dec.attention.parameters():
        p.requires_grad_(True)

    def weight_on_best():
        with torch.no_grad():
            return float(dec(features, captions, lengths)[1][0, :, best].mean())
    before = weight_on_best()
    obj, opt = objective(dec), torch.optim.SGD(dec.attention.parameters(), lr=0.2)
    batch = TrainItem(features, captions, lengths, torch.arange(1))
    for seed in range(400):
        opt.zero_grad()
        obj(batch, Step(3, 1, seed=seed))[0].backward()
        opt.step()
    assert weight_on_best() > before + 0.2, (costs, before, weight_on_best())


def test_the_entropy_term_has_the_gradient_of_finite_differences():
    features, captions, lengths = toy(2, 3)
    dec = decoder(seed=7)
    obj = objective(dec, hard_sample_p=0.0, hard_lambda_e=1.0)
    batch, step = TrainItem(features, captions, lengths, torch.arange(2)), Step(int((lengths - 1).sum()), 2, seed=0)

    def entropy_part():  # the loss without the likelihood: minus the entropy bonus
        return obj(batch, step)[0] - caption_loss(*dec(features, captions, lengths), captions, lengths,
                                                  0.0, step.tokens, 2).loss
    dec.zero_grad()
    entropy_part().backward()
    weight = dec.attention.full_att.weight
    analytic = weight.grad.clone()
    numeric = torch.zeros_like(weight)
    for i in range(weight.numel()):  # central differences; a wide step, since alpha's softmax runs in float32
        with torch.no_grad():
            weight.view(-1)[i] += 1e-3
            up = float(entropy_part())
            weight.view(-1)[i] -= 2e-3
            down = float(entropy_part())
            weight.view(-1)[i] += 1e-3
        numeric.view(-1)[i] = (up - down) / 2e-3
    torch.testing.assert_close(analytic, numeric, atol=2e-5, rtol=1e-3)
    assert analytic.abs().max() > 1e-2


def test_padded_steps_get_no_gradient_from_the_extra_terms():
    """The REINFORCE and entropy terms: the same gradient whatever the padding holds, and none at all
    through the alphas of padded steps."""
    features, captions, lengths = toy(3, 4)
    lengths = torch.tensor([4, 6, 3])  # captions of 2, 4 and 1 words
    for i, n in enumerate(lengths.tolist()):
        captions[i, n:] = 0
        captions[i, n - 1] = VOCAB.end
    junk = captions.clone()
    junk[captions == 0] = 3  # a word where padding is
    batch = lambda c: TrainItem(features, c, lengths, torch.arange(3))  # noqa: E731
    results = []
    for caps in (captions, junk):
        dec = decoder(seed=1)
        obj = objective(dec, hard_lambda_e=0.5)
        obj.baseline.fill_(1.0)
        dec.zero_grad()
        obj(batch(caps), Step(int((lengths - 1).sum()), 3, seed=4))[0].backward()
        results.append(grads(dec))
    torch.testing.assert_close(results[0], results[1])
    dec = decoder(seed=1)
    obj = objective(dec, hard_lambda_e=0.5)
    obj.baseline.fill_(1.0)
    forward, seen = dec.forward, {}

    def keep_alphas(*args, **kw):
        out = forward(*args, **kw)
        out[1].retain_grad()
        seen["alphas"] = out[1]
        return out
    dec.forward = keep_alphas
    obj(batch(captions), Step(int((lengths - 1).sum()), 3, seed=4))[0].backward()
    for i, n in enumerate(lengths.tolist()):  # steps n - 1 onwards predict padding
        assert seen["alphas"].grad[i, n - 1:].abs().sum() == 0


def test_argmax_decoding_gives_one_hot_maps_and_batched_beams_equal_one_at_a_time():
    dec = decoder(seed=4).float().eval()
    with torch.no_grad():
        dec.fc.bias[VOCAB.end] += 1.0
    dec.argmax_attention = True
    features = torch.randn(6, P, D)
    out = greedy(dec, features, VOCAB, max_len=8)
    for maps in out.alphas:
        ones = torch.ones(len(maps))
        assert torch.equal(maps.max(1).values, ones) and torch.equal(maps.sum(1), ones)
    options = DecodeOptions(beam_size=3, max_len=8)
    batched = beam_search(dec, features, VOCAB, options)
    for i in range(6):
        single = beam_search(dec, features[i:i + 1], VOCAB, options)
        assert single.seqs[0] == batched.seqs[i]
        torch.testing.assert_close(single.alphas[0], batched.alphas[i])
