"""train.py --objective scst: self-critical training from a tiny cross-entropy checkpoint."""

import pytest

from tests.helpers import kill_then_resume, log_records, run_script, same_weights, scst_args, torchrun



def test_scst_raises_the_mean_training_reward(scst_run):
    epochs = log_records(scst_run, "epoch")
    assert len(epochs) == 4 and "val_cider" in epochs[0]
    rewards = [e["train_reward"] for e in epochs]
    assert rewards[-1] > rewards[0], rewards
    steps = log_records(scst_run, "step")
    assert {"reward", "baseline", "sample_length", "ended"} <= set(steps[0]) and 0 <= steps[0]["ended"] <= 1


def test_scst_refusals(trained, shapes_data, tmp_path):
    for args, needle in ((dict(scst_samples=1), "needs scst_samples >= 2"),
                         (dict(decoder="rnn"), "--init_from needs the same model and data"),
                         (dict(init_from=""), "give --init_from")):
        r = run_script("train.py", *scst_args(tmp_path / "x", shapes_data, trained("attention"), **args))
        assert r.returncode == 2 and needle in r.stderr.splitlines()[-1], r.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("decoder", ["rnn", "transformer"])
def test_scst_resumed_after_sigkill_ends_bit_identical(trained, shapes_data, tmp_path, decoder):
    """Also for the Transformer, whose samples go through its cached steps, at scst_lr without warm-up."""
    common = dict(epochs=2, checkpoint_every=1, log_every=1, scst_baseline="greedy")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = run_script("train.py", *scst_args(straight, shapes_data, trained(decoder), **common))
    assert r.returncode == 0, r.stderr
    kill_then_resume(scst_args(killed, shapes_data, trained(decoder), **common), killed, lines=4)
    assert same_weights(straight, killed)
    assert log_records(straight) == log_records(killed)
    assert {r["lr"] for r in log_records(straight, "step")} == {1e-3}  # scst_args' scst_lr, never warmed up


def test_scst_under_torchrun_keeps_the_ranks_equal(trained, shapes_data, tmp_path):
    """DDP wraps the self-critical objective as it wraps cross-entropy: both ranks end with the same
    weights (train.py checks and says so at the end)."""
    out = tmp_path / "ddp"
    r = torchrun(2, *scst_args(out, shapes_data, trained("rnn"), epochs=1, batch_size=4, accumulation_steps=2))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ranks agree: identical parameters on all 2 processes" in r.stdout
    (epoch,) = log_records(out, "epoch")
    assert epoch["train_reward"] > 0 and 0 < epoch["train_ended"] <= 1
