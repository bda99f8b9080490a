"""train.py's crash safety: SIGKILL at any moment, Ctrl-C and SIGTERM, non-finite losses, out of memory,
a full disk."""
import errno
import glob
import os
import signal
import subprocess
import sys

import pytest
import torch

import objectives
import train
from tests.helpers import (ROOT, load, log_lines, log_records, popen, run_main, run_script, same_weights, train_args,
                           wait_for)


RUN = dict(decoder="attention", epochs=2, checkpoint_every=1, log_every=1)


@pytest.fixture(scope="module")
def straight(shapes_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("straight") / "run"
    r = run_script("train.py", *train_args(run, shapes_data, **RUN))
    assert r.returncode == 0, r.stderr
    return run


KILL_POINTS = {
    "mid-epoch": lambda run, err: log_lines(run) >= 5,
    "validation": lambda run, err: "validate" in err.read_text(),
    # while a later last.pt is being written over an earlier one
    "checkpoint write": lambda run, err: log_lines(run) >= 3 and bool(glob.glob(str(run / "last.pt.tmp*"))),
}


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_ends_with_the_uninterrupted_weights(straight, shapes_data, tmp_path, point):
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = popen(train_args(run, shapes_data, **RUN), stderr)
        caught = wait_for(proc, lambda: KILL_POINTS[point](run, err))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert caught, f"the run ended before the kill point {point!r}"
    assert load(run / "last.pt")["step"] >= 1  # whole and loadable, never half-written
    if (run / "best.pt").exists():
        load(run / "best.pt")
    r = run_script("train.py", "--resume", run / "last.pt")
    assert r.returncode == 0, r.stderr
    assert not glob.glob(str(run / "*.tmp*"))  # a killed write leaves no debris after the resume
    assert same_weights(straight, run)
    assert log_records(straight) == log_records(run)


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_last_once_then_resume_finishes(straight, shapes_data, tmp_path, sig, code):
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = popen(train_args(run, shapes_data, **dict(RUN, checkpoint_every=0)), stderr)
        assert wait_for(proc, lambda: log_lines(run) >= 3)
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
    text = err.read_text()
    assert text.count(f"{sig.name}: saving last.pt") == 1 and "--resume" in text
    saved = load(run / "last.pt")
    assert 3 <= saved["step"] < load(straight / "last.pt")["step"]
    r = run_script("train.py", "--resume", run / "last.pt")
    assert r.returncode == 0, r.stderr
    assert same_weights(straight, run)


def test_ctrl_c_from_a_terminal_with_loader_workers(shapes_data, tmp_path):
    """A terminal's Ctrl-C reaches the whole process group, DataLoader workers included: they leave it
    to the main process, which saves once."""
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    with open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "train.py", *map(str, train_args(run, shapes_data, **dict(
            RUN, checkpoint_every=0, workers=2)))], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True)
        assert wait_for(proc, lambda: log_lines(run) >= 3)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    text = err.read_text()
    assert text.count("SIGINT: saving last.pt") == 1 and "Traceback" not in text
    assert load(run / "last.pt")["step"] >= 3


def test_second_ctrl_c_quits_at_once(shapes_data, tmp_path):
    run, err = tmp_path / "run", tmp_path / "stderr.txt"
    big = dict(RUN, checkpoint_every=0, epochs=50, batch_size=64, emb_dim=256, decoder_dim=512, attention_dim=256)
    with open(err, "w") as stderr:  # steps of a few hundred ms: the second Ctrl-C lands inside the step
        proc = popen(train_args(run, shapes_data, **big), stderr)
        assert wait_for(proc, lambda: log_lines(run) >= 1)
        proc.send_signal(signal.SIGINT)
        assert wait_for(proc, lambda: "saving last.pt" in err.read_text())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    text = err.read_text()
    assert "interrupted" in text and "saved" not in text and not (run / "last.pt").exists()
    assert not glob.glob(str(run / "*.tmp*"))


def test_nonfinite_steps_are_skipped_then_training_stops(shapes_data, tmp_path):
    # lr 1e30 makes the first step's weights overflow the attention scores: every later gradient is NaN.
    run = tmp_path / "run"
    r = run_script("train.py", *train_args(run, shapes_data, decoder="attention", decoder_lr=1e30,
                                           max_nonfinite_steps=3))
    assert r.returncode == 2, r.stderr
    (line,) = [ln for ln in r.stderr.splitlines() if "error:" in ln]
    assert "not finite for 3 steps in a row" in line and "step 4" in line and "decoder_lr" in line
    steps = log_records(run)
    assert [s["skipped_steps"] for s in steps] == [0, 1, 2] and "loss" not in steps[-1]  # step 4 raised
    assert not (run / "best.pt").exists()  # the epoch never ended: nothing was judged best


def test_out_of_memory_names_the_batch_size(shapes_data, tmp_path, monkeypatch, capsys):
    def oom(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(train, "train_step", oom)
    handler = signal.getsignal(signal.SIGINT)
    code, err = run_main(train, train_args(tmp_path / "run", shapes_data, batch_size=8, accumulation_steps=2),
                         monkeypatch, capsys)
    assert code == 2 and "out of memory" in err and "batch_size 8" in err and "--accumulation_steps 4" in err
    assert err.splitlines()[-1].startswith("error: out of memory")  # the progress bar was cleared first
    assert signal.getsignal(signal.SIGINT) is handler  # train.py's handlers are gone again


def test_validation_builds_no_graph(shapes_data, tmp_path, monkeypatch):
    seen = []
    real = objectives.caption_loss  # training's loss and validation's both come from the objective

    def spy(logits, *args, **kw):
        seen.append((torch.is_grad_enabled(), logits.requires_grad))
        return real(logits, *args, **kw)
    monkeypatch.setattr(objectives, "caption_loss", spy)
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, train_args(tmp_path / "run", shapes_data, epochs=1))])
    train.main()
    training, validation = seen[:-1], seen[-1]  # 6 VAL images: one validation batch, last
    assert all(g and r for g, r in training) and validation == (False, False)


def test_full_disk_while_writing_a_checkpoint(shapes_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    assert run_script("train.py", *train_args(run, shapes_data, epochs=1)).returncode == 0
    before = (run / "last.pt").read_bytes()
    real_save = torch.save

    def full(obj, path):  # writes part of the file, then the disk is full
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(torch, "save", full)
    code, err = run_main(train, ["--resume", run / "last.pt", "--epochs", 2], monkeypatch, capsys)
    monkeypatch.setattr(torch, "save", real_save)
    assert code == 2 and "no space left" in err and "last.pt" in err
    assert (run / "last.pt").read_bytes() == before and not glob.glob(str(run / "*.tmp*"))


def test_checkpoint_save_is_atomic_against_a_crash_inside_torch_save(tmp_path):
    """A save that dies half-way (here: an exception, as a kill would) leaves the previous file."""
    from utils import atomic_path
    path = tmp_path / "last.pt"
    torch.save({"step": 1}, path)
    with pytest.raises(RuntimeError), atomic_path(str(path)) as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("unexpected pos 704 vs 598")
    assert load(path) == {"step": 1} and os.listdir(tmp_path) == ["last.pt"]
