"""train.py --attention hard end to end on tiny shapes data: exact resume with the baseline, torchrun,
self-critical training from a hard checkpoint, and eval.py's two inferences."""
import base64
import json

import pytest

from tests.helpers import (kill_then_resume, load, log_records, run_script, same_weights, scst_args, torchrun, train,
                           train_args)


HARD = dict(decoder="attention", attention="hard", hard_estimator="reinforce", dropout=0.0)


@pytest.fixture(scope="module")
def hard_run(shapes_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("hard") / "run"
    r = train(run, shapes_data, epochs=6, decoder_lr=5e-3, log_every=2, patience=0, emb_dim=32, decoder_dim=64,
              **HARD)
    assert r.returncode == 0, r.stderr
    return run


def test_hard_training_logs_its_baseline_entropy_and_gradient_variance(hard_run):
    steps = log_records(hard_run, "step")
    assert all({"baseline", "entropy", "attention_grad_var", "attention_grad_snr"} <= set(s) for s in steps)
    assert 0 < steps[-1]["entropy"] < 2.78  # nats per word, under ln 16 for the 4x4 grid
    assert load(hard_run / "last.pt")["objective"]["baseline"] == steps[-1]["baseline"]


def test_killed_and_resumed_ends_bit_identical_with_its_baseline(shapes_data, tmp_path):
    common = dict(HARD, epochs=2, checkpoint_every=1, log_every=1)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = train(straight, shapes_data, **common)
    assert r.returncode == 0, r.stderr
    kill_then_resume(train_args(killed, shapes_data, **common), killed, lines=6)
    assert same_weights(straight, killed)
    assert load(straight / "last.pt")["objective"] == load(killed / "last.pt")["objective"]
    assert log_records(straight) == log_records(killed)


def test_two_processes_draw_what_one_draws_at_the_global_batch(shapes_data, tmp_path):
    """Each rank takes its rows of the global micro-batch's draws: the same cells, the same baseline."""
    common = dict(HARD, epochs=1, accumulation_steps=2, log_every=1)
    r = torchrun(2, *train_args(tmp_path / "ddp", shapes_data, batch_size=4, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ranks agree: identical parameters on all 2 processes" in r.stdout
    s = run_script("train.py", *train_args(tmp_path / "single", shapes_data, batch_size=8, **common))
    assert s.returncode == 0, s.stderr
    one, two = log_records(tmp_path / "single", "step"), log_records(tmp_path / "ddp", "step")
    assert [x["step"] for x in one] == [x["step"] for x in two]
    for x, y in zip(one, two, strict=True):
        for key in ("loss", "ce", "entropy", "baseline"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (x["step"], key)


def test_self_critical_training_starts_from_a_hard_checkpoint(hard_run, shapes_data, tmp_path):
    r = run_script("train.py", *scst_args(tmp_path / "scst", shapes_data, hard_run / "best.pt", epochs=1))
    assert r.returncode == 0, r.stderr
    (epoch,) = log_records(tmp_path / "scst", "epoch")
    assert epoch["train_reward"] > 0


def test_both_inferences_are_evaluated_and_compared(hard_run, trained, tmp_path):
    """The expected context and the argmax cell: one-hot maps for argmax, and compare.py reads the
    second results file beside the first."""
    for extra in ((), ("--hard-inference", "argmax", "--out", hard_run / "eval_TEST_argmax.json")):
        r = run_script("eval.py", "--checkpoint", hard_run / "best.pt", "--beam-size", 1, 3, *extra)
        assert r.returncode == 0, r.stderr
    expected = json.loads((hard_run / "eval_TEST.json").read_text())
    argmax = json.loads((hard_run / "eval_TEST_argmax.json").read_text())
    assert (expected["attention_inference"], argmax["attention_inference"]) == ("expected", "argmax")
    assert argmax["results"]["beam3"]["attention_entropy"] == 0 and argmax["results"]["beam3"]["attention_peaked"] == 1
    assert expected["results"]["beam3"]["attention_entropy"] > 0
    table = json.loads((hard_run / "eval_TEST_argmax_images_beam3.json").read_text())
    for row in table["images"]:
        maps = base64.b64decode(row["attention"])
        for k in range(0, len(maps), 16):  # each word's 4x4 map: one cell at 255, the others 0
            assert sorted(maps[k:k + 16]) == [0] * 15 + [255]
    soft = trained("attention").parent
    r = run_script("compare.py", soft, hard_run, hard_run / "eval_TEST_argmax.json", "--out", tmp_path / "report",
                   "--beam-size", 3)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    assert "run-argmax (hard attention, argmax)" in report and "run (hard attention, expected)" in report
    assert "## Attention maps" in report and (tmp_path / "report" / "attention_curves.png").stat().st_size > 10000
