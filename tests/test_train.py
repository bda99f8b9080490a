"""train.py end to end on tiny shapes data: both decoders, exact resume, overfitting, bf16, early stop."""
import json

import pytest
import torch
import yaml

from tests.conftest import run_script, train_args

TIMING = ("images_per_s", "epoch_time_s", "peak_memory_mb")


def train(out, data, *extra, **overrides):
    return run_script("train.py", *train_args(out, data, **overrides), *extra)


def log_of(run, kind=None):
    with open(run / "log.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if kind in (None, r["kind"])]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("decoder", ["rnn", "attention"])
def test_shapes_config_runs_both_decoders(tmp_path, shapes_data, decoder):
    run = tmp_path / decoder
    r = train(run, shapes_data, decoder=decoder, epochs=1)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "log.jsonl", "last.pt", "best.pt"}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["decoder"] == decoder and cfg["emb_dim"] == 16 and cfg["out"] == str(run)
    ckpt = load(run / "best.pt")
    assert ckpt["config"] == cfg and ckpt["word_map"]["<pad>"] == 0 and ckpt["epoch"] == 1
    assert {"encoder", "decoder", "decoder_optimizer", "scaler", "rng", "best", "bad_epochs"} <= set(ckpt)
    (epoch,) = log_of(run, "epoch")
    assert 0 <= epoch["val_bleu4"] <= 1 and 0 < epoch["val_top5"] <= 1 and epoch["val_loss"] > 0
    assert '"decoder": "' + decoder in r.stdout  # the resolved config is printed


@pytest.mark.parametrize("decoder,stop", [("rnn", {"epochs": 1}), ("attention", {"max_steps": 5})])
def test_resume_gives_identical_weights_and_logs(tmp_path, shapes_data, decoder, stop):
    """2 epochs straight == stopped (at an epoch end, or mid-epoch at max_steps) + --resume."""
    # fine-tuning on, so optimiser state of both encoder and decoder must survive the resume
    common = dict(decoder=decoder, fine_tune_encoder="true", encoder_stages=2, accumulation_steps=2,
                  encoder_weights="none")
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert train(straight, shapes_data, epochs=2, **common).returncode == 0
    assert train(split, shapes_data, **{"epochs": 2, **common, **stop}).returncode == 0
    assert load(split / "last.pt")["step"] < load(straight / "last.pt")["step"]
    r = run_script("train.py", "--resume", split / "last.pt", "--epochs", 2, "--max_steps", 0)
    assert r.returncode == 0, r.stderr
    a, b = load(straight / "last.pt"), load(split / "last.pt")
    for part in ("encoder", "decoder"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a["step"] == b["step"] and a["best"] == b["best"]
    assert log_of(straight) == log_of(split)


def test_overfits_sixteen_images(tmp_path):
    data = tmp_path / "data"
    r = run_script("create_input_files.py", "--dataset", "shapes", "--output-folder", data,
                   "--num-images", 20, "--min-word-freq", 0, "--workers", 1)
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    r = train(run, data, decoder="attention", epochs=50, dropout=0.0, batch_size=16, decoder_lr=1e-2,
              emb_dim=32, decoder_dim=64, alpha_c=0.0, patience=0, lr_decay_patience=0, log_every=100,
              encoder_weights="none")
    assert r.returncode == 0, r.stderr
    epochs = log_of(run, "epoch")
    assert epochs[0]["train_ce"] > 2.0 and epochs[-1]["train_ce"] < 0.3, [e["train_ce"] for e in epochs]


def test_bf16_autocast_on_cpu(tmp_path, shapes_data):
    r = train(tmp_path / "run", shapes_data, decoder="attention", epochs=1, amp="true", amp_dtype="bfloat16")
    assert r.returncode == 0, r.stderr
    (epoch,) = log_of(tmp_path / "run", "epoch")
    assert epoch["train_loss"] == epoch["train_loss"] and epoch["val_loss"] < 10  # finite


def test_early_stopping(tmp_path, shapes_data):
    # A learning rate too small to change any caption: BLEU-4 stays put after the first epoch.
    # (attention: no BatchNorm statistics in the decoder to move the validation loss either)
    r = train(tmp_path / "run", shapes_data, decoder="attention", epochs=6, patience=2, decoder_lr=1e-12)
    assert r.returncode == 0, r.stderr
    epochs = log_of(tmp_path / "run", "epoch")
    assert len(epochs) == 3 and [e["best"] for e in epochs] == [True, False, False]
    assert "early stop" in r.stdout


def test_every_shipped_config_loads():
    """Each configs/*.yaml only uses known keys with the right types."""
    import glob
    import os

    from tests.conftest import ROOT
    from utils import default_config, merge_config, read_yaml
    paths = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
    assert len(paths) == 5
    for path in paths:
        merge_config(default_config(), read_yaml(path), path)


def test_cached_features_give_the_same_loss_curve(tmp_path, shapes_data):
    """A frozen encoder's features, cached once as float16, train like re-encoding every epoch."""
    common = dict(decoder="attention", epochs=2, encoded_size=3)  # a grid no other test caches
    assert train(tmp_path / "encode", shapes_data, cache_features="false", **common).returncode == 0
    before = set((shapes_data / "cache").glob("*.npy"))  # other tests' caches: other encoder settings
    r = train(tmp_path / "cached", shapes_data, cache_features="auto", **common)
    assert r.returncode == 0, r.stderr
    caches = sorted(set((shapes_data / "cache").glob("*.npy")) - before)
    assert [c.name.split("_")[0] for c in caches] == ["TRAIN", "VAL"] and "cached TRAIN" in r.stdout
    a, b = log_of(tmp_path / "encode"), log_of(tmp_path / "cached")
    assert len(a) == len(b) > 10
    for x, y in zip(a, b, strict=True):
        for k in ("loss", "ce", "val_loss", "val_bleu4"):
            if k in x:
                assert y[k] == pytest.approx(x[k], rel=2e-3, abs=2e-3), (k, x, y)
    stamp = [c.stat().st_mtime_ns for c in caches]
    r = train(tmp_path / "again", shapes_data, cache_features="true", **common)
    assert r.returncode == 0 and "cached TRAIN" not in r.stdout  # found, not rebuilt
    assert [c.stat().st_mtime_ns for c in caches] == stamp
    r = train(tmp_path / "bad", shapes_data, cache_features="true", fine_tune_encoder="true", encoder_stages=2,
              encoder_weights="none")
    assert r.returncode == 2 and "frozen" in r.stderr
