"""train.py under torchrun: 2 gloo processes on the CPU against one process at the same global batch."""
import json

import pytest
import torch

from tests.helpers import load, log_records, run_script, torchrun, train_args


# Dropout off, so both runs draw no random numbers in training and must agree up to float summation order.
COMMON = dict(decoder="attention", dropout=0.0, epochs=2, accumulation_steps=2, log_every=1)


TOLERANCE = 1e-4  # relative, on every logged training loss


def losses(run):
    with open(run / "log.jsonl") as f:
        return [r for r in map(json.loads, f)]


@pytest.fixture(scope="module")
def two_process_run(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    r = torchrun(2, *train_args(out, shapes_data, batch_size=4, **COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


def test_two_processes_match_one_at_the_same_global_batch(two_process_run, shapes_data, tmp_path):
    ddp, r = two_process_run
    assert "ranks agree: identical parameters on all 2 processes" in r.stdout
    assert r.stdout.count("epoch 1:") == 1  # only rank 0 prints and logs
    single = tmp_path / "single"
    s = run_script("train.py", *train_args(single, shapes_data, batch_size=8, **COMMON))
    assert s.returncode == 0, s.stderr
    a, b = losses(single), losses(ddp)
    assert [x["step"] for x in a] == [x["step"] for x in b]  # same number of steps and log lines
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "ce", "train_loss", "val_loss", "val_bleu4"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=TOLERANCE, abs=1e-6), (x["step"], key)
    wa, wb = load(single / "last.pt")["decoder"], load(ddp / "last.pt")["decoder"]
    for k in wa:
        if k == "attention.full_att.bias":
            continue  # softmax ignores it: its gradient is rounding noise, which Adam scales up to lr-sized steps
        assert torch.allclose(wa[k], wb[k], rtol=1e-3, atol=1e-5), k


def test_resume_under_torchrun_with_the_same_or_another_world_size(two_process_run, shapes_data, tmp_path):
    straight, _ = two_process_run
    split = tmp_path / "split"
    r = torchrun(2, *train_args(split, shapes_data, batch_size=4, max_steps=5, **COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    assert load(split / "last.pt")["step"] == 5
    r = torchrun(2, "--resume", split / "last.pt", "--max_steps", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load(straight / "last.pt"), load(split / "last.pt")
    assert a["step"] == b["step"]
    for k in a["decoder"]:
        assert torch.equal(a["decoder"][k], b["decoder"][k]), k
    assert log_records(straight) == log_records(split)  # the log too, without duplicated lines

    # A 2-process checkpoint continued by one process at batch 8: the same global batch, so the same
    # samples in the same order.
    one = tmp_path / "one"
    r = torchrun(2, *train_args(one, shapes_data, batch_size=4, max_steps=5, **COMMON))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("train.py", "--resume", one / "last.pt", "--max_steps", 0, "--batch_size", 8)
    assert r.returncode == 0, r.stderr
    c = load(one / "last.pt")
    assert c["step"] == a["step"]
    for k in a["decoder"]:
        if k != "attention.full_att.bias":  # see above
            assert torch.allclose(a["decoder"][k], c["decoder"][k], rtol=1e-3, atol=1e-5), k


def test_grouped_batches_on_two_processes_match_one(shapes_data, tmp_path):
    """group_by_image under torchrun: the ranks take every other image of the global batch."""
    grouped = dict(COMMON, epochs=1, group_by_image="true", train_captions_per_image=2)
    r = torchrun(2, *train_args(tmp_path / "ddp", shapes_data, batch_size=4, **grouped))
    assert r.returncode == 0, r.stderr[-3000:]
    s = run_script("train.py", *train_args(tmp_path / "single", shapes_data, batch_size=8, **grouped))
    assert s.returncode == 0, s.stderr
    a, b = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "ce", "train_loss", "val_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=TOLERANCE, abs=1e-6), (x["step"], key)


def test_transformer_on_two_processes_matches_one(shapes_data, tmp_path):
    """The Transformer under DDP, grouped batches and accumulation, inside its warm-up: two processes at
    batch 4 give the losses and weights of one at batch 8."""
    common = dict(decoder="transformer", transformer_dropout=0.0, epochs=1, accumulation_steps=2, log_every=1,
                  group_by_image="true", train_captions_per_image=2)
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    r = torchrun(2, *train_args(ddp, shapes_data, batch_size=4, **common))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ranks agree: identical parameters on all 2 processes" in r.stdout
    assert run_script("train.py", *train_args(single, shapes_data, batch_size=8, **common)).returncode == 0
    a, b = losses(single), losses(ddp)
    assert [x["step"] for x in a] == [x["step"] for x in b]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "train_loss", "val_loss", "lr"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=TOLERANCE, abs=1e-6), (x["step"], key)
    wa, wb = load(single / "last.pt")["decoder"], load(ddp / "last.pt")["decoder"]
    dim = wa["layers.0.query.bias"].numel()
    for k in wa:
        # a key's bias adds the same to every score of a query, which softmax ignores: its gradient is
        # rounding noise, which Adam scales up to lr-sized steps (as the attention LSTM's full_att.bias)
        keep = slice(None)
        if k.endswith("qkv.bias"):
            keep = torch.cat([torch.arange(dim), torch.arange(2 * dim, 3 * dim)])
        elif k.endswith("key_value.bias"):
            keep = torch.arange(dim, 2 * dim)
        assert torch.allclose(wa[k][keep], wb[k][keep], rtol=1e-3, atol=1e-5), k
