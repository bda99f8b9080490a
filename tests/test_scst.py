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


# ----------------------------------------------------------------------------- train.py --objective scst

def scst_args(out, data, init, **overrides):
    """train.py --objective scst from a tiny trained checkpoint, which brings its model settings."""
    cfg = dict(objective="scst", init_from=init, data_folder=data, out=out, scst_lr=1e-3, scst_max_len=12,
               batch_size=8, epochs=4, patience=0, lr_decay_patience=0, log_every=2, workers=0, val_max_images=0)
    cfg.update(overrides)
    return [a for k, v in cfg.items() for a in (f"--{k}", v)]


@pytest.mark.slow
def test_scst_raises_the_mean_training_reward(trained, shapes_data, tmp_path):
    from tests.conftest import log_records, run_script
    run = tmp_path / "scst"
    r = run_script("train.py", *scst_args(run, shapes_data, trained("attention")))
    assert r.returncode == 0, r.stderr
    epochs = log_records(run, "epoch")
    assert len(epochs) == 4 and "val_cider" in epochs[0]
    rewards = [e["train_reward"] for e in epochs]
    assert rewards[-1] > rewards[0], rewards
    steps = log_records(run, "step")
    assert {"reward", "baseline", "sample_length", "ended"} <= set(steps[0]) and 0 <= steps[0]["ended"] <= 1
    # compare.py pairs the scst run with the run it started from and says what changed
    xe = trained("attention").parent
    for folder in (xe, run):
        assert run_script("eval.py", "--checkpoint", folder / "best.pt", "--beam-size", 1, "--workers", 0,
                          "--out", folder / "eval_TEST.json").returncode == 0
    r = run_script("compare.py", xe, run, "--out", tmp_path / "report", "--beam-size", 1, "--images", 2)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## What self-critical training changed" in report and f"{xe.name} -> scst" in report
    assert "caption length" in report and "The template that moved most" in report
    assert (tmp_path / "report" / "scst_curves.png").stat().st_size > 10000


@pytest.mark.slow
def test_scst_refusals(trained, shapes_data, tmp_path):
    from tests.conftest import run_script
    for args, needle in ((dict(scst_samples=1), "needs scst_samples >= 2"),
                         (dict(decoder="rnn"), "--init_from needs the same model and data"),
                         (dict(init_from=""), "give --init_from")):
        r = run_script("train.py", *scst_args(tmp_path / "x", shapes_data, trained("attention"), **args))
        assert r.returncode == 2 and needle in r.stderr.splitlines()[-1], r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_scst_resumed_after_sigkill_ends_bit_identical(trained, shapes_data, tmp_path):
    import signal

    from tests.conftest import log_lines, log_records, popen, run_script, wait_for, weights
    common = dict(epochs=2, checkpoint_every=1, log_every=1, scst_baseline="greedy")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = run_script("train.py", *scst_args(straight, shapes_data, trained("rnn"), **common))
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "err.txt", "w") as err:
        proc = popen(scst_args(killed, shapes_data, trained("rnn"), **common), err)
        assert wait_for(proc, lambda: log_lines(killed) >= 4)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = run_script("train.py", "--resume", killed / "last.pt")
    assert r.returncode == 0, r.stderr
    a, b = weights(straight / "last.pt"), weights(killed / "last.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_records(straight) == log_records(killed)


@pytest.mark.slow
def test_scst_under_torchrun_keeps_the_ranks_equal(trained, shapes_data, tmp_path):
    """Sampling bypasses DDP's hooks; the gradients averaged by hand must leave both ranks with the
    same weights (train.py checks and says so at the end)."""
    from tests.conftest import log_records, torchrun
    out = tmp_path / "ddp"
    r = torchrun(2, *scst_args(out, shapes_data, trained("rnn"), epochs=1, batch_size=4, accumulation_steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ranks agree: identical parameters on all 2 processes" in r.stdout
    (epoch,) = log_records(out, "epoch")
    assert epoch["train_reward"] > 0 and 0 < epoch["train_ended"] <= 1
