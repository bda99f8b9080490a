"""train.py end to end on tiny shapes data: every decoder, exact resume, overfitting, bf16, early stop,
the config, and every bad setting (exit status 2, one `error:` line, nothing written)."""
import contextlib
import glob
import json
import math
import os
import re
import shutil
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import ROOT, copy_data, files, load, log_records, refused, run_script, train, train_args
from checkpoint import load_checkpoint
import models
from models import DECODERS
from utils import InputError


@pytest.mark.parametrize("decoder", DECODERS)
def test_shapes_config_runs_every_decoder(tmp_path, shapes_data, decoder):
    run = tmp_path / decoder
    r = train(run, shapes_data, decoder=decoder, epochs=1)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "log.jsonl", "last.pt", "best.pt"}
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["decoder"] == decoder and cfg["emb_dim"] == 16 and cfg["out"] == str(run)
    ckpt = load(run / "best.pt")
    assert ckpt["config"] == cfg and ckpt["word_map"]["<pad>"] == 0 and ckpt["epoch"] == 1
    assert {"encoder", "decoder", "decoder_optimizer", "scaler", "rng", "best", "bad_epochs"} <= set(ckpt)
    (epoch,) = log_records(run, "epoch")
    assert 0 <= epoch["val_bleu4"] <= 1 and 0 < epoch["val_top5"] <= 1 and epoch["val_loss"] > 0
    said = next(line for line in r.stdout.splitlines() if line.startswith("config (all of it in"))
    assert "emb_dim=16" in said and "alpha_c=" not in said  # only what differs from configs/default.yaml
    assert (f"decoder={decoder}" in said) == (decoder != "attention")  # attention is the default


GROUPED = {"group_by_image": "true", "train_captions_per_image": 2}  # batches of 4 images x 2 captions


@pytest.mark.parametrize("decoder,stop,grouping", [
    ("rnn", {"epochs": 1}, {}), ("attention", {"max_steps": 5}, {"length_pool": 3, "lr_schedule": "cosine"}),
    ("attention", {"max_steps": 5}, {**GROUPED, "length_pool": 2}), ("transformer", {"max_steps": 3}, GROUPED)])
def test_resume_gives_identical_weights_and_logs(tmp_path, shapes_data, decoder, stop, grouping):
    """2 epochs straight == stopped (at an epoch end, or mid-epoch at max_steps) + --resume; also with
    grouped batches, batches of similar lengths (length_pool), the cosine schedule over both epochs,
    and for the Transformer inside its warm-up (their rates follow the step counter)."""
    # fine-tuning on, so optimiser state of both encoder and decoder must survive the resume
    common = dict(decoder=decoder, fine_tune_encoder="true", encoder_stages=2, accumulation_steps=2,
                  encoder_weights="none", **grouping)
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
    assert log_records(straight) == log_records(split)
    if "lr_schedule" in grouping:  # a half cosine over the two epochs' steps, set before each step
        total, base = a["step"], a["config"]["decoder_lr"]
        assert [r["lr"] for r in log_records(straight, "step")] == pytest.approx(
            [base * (1 + math.cos(math.pi * (r["step"] - 1) / total)) / 2 for r in log_records(straight, "step")])
    if decoder == "transformer":  # the rate rose over 4 steps, then fell as 1 / sqrt(step)
        rates = [r["lr"] for r in log_records(straight, "step")]
        base = a["config"]["decoder_lr"]
        assert rates[:5] == pytest.approx([base * s / 4 for s in (1, 2, 3, 4)] + [base * (4 / 5) ** 0.5])
        assert a["decoder_optimizer"]["param_groups"][0]["betas"] == (0.9, 0.98)


@pytest.mark.slow  # over 5 s alone: make test only
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
    epochs = log_records(run, "epoch")
    assert epochs[0]["train_ce"] > 2.0 and epochs[-1]["train_ce"] < 0.3, [e["train_ce"] for e in epochs]


# ONEDNN_MAX_CPU_ISA=AVX2 makes this CPU behave as an AVX2-only one (AMD Zen 3, Intel before Sapphire
# Rapids), whose oneDNN has no bf16 kernel for nn.LSTM: the plain decoder must still train.
@pytest.mark.parametrize("decoder,isa", [("rnn", "native"), ("rnn", "AVX2"), ("attention", "native"),
                                         ("attention", "AVX2"), ("transformer", "native")])
def test_bf16_autocast_on_cpu(tmp_path, shapes_data, decoder, isa):
    env = dict(os.environ, **({"ONEDNN_MAX_CPU_ISA": isa} if isa != "native" else {}))
    r = train(tmp_path / "run", shapes_data, decoder=decoder, epochs=1, amp="true", amp_dtype="bfloat16", env=env)
    assert r.returncode == 0, r.stderr
    (epoch,) = log_records(tmp_path / "run", "epoch")
    assert math.isfinite(epoch["train_loss"]) and epoch["val_loss"] < 10
    if decoder == "rnn" and isa == "AVX2":
        assert r.stderr.count("no bf16 kernel for nn.LSTM") == 1  # said once


def test_resumed_copy_of_a_run_writes_into_the_copy(tmp_path, shapes_data):
    """cp -r runs/a runs/b && train.py --resume runs/b/last.pt: runs/a stays byte-for-byte as it was."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(a, shapes_data, decoder="rnn", epochs=1).returncode == 0
    shutil.copytree(a, b)
    before = {p.name: p.read_bytes() for p in a.iterdir()}
    r = run_script("train.py", "--resume", b / "last.pt", "--epochs", 2)
    assert r.returncode == 0, r.stderr
    assert {p.name: p.read_bytes() for p in a.iterdir()} == before
    ckpt = load(b / "last.pt")
    assert ckpt["epoch"] == 2 and ckpt["config"]["out"] == str(b) and len(log_records(b, "epoch")) == 2
    assert yaml.safe_load((b / "config.yaml").read_text())["out"] == str(b)
    r = run_script("train.py", "--resume", b / "last.pt", "--epochs", 3, "--out", tmp_path / "c")
    assert r.returncode == 0, r.stderr  # --out still says where a resumed run goes
    assert load(tmp_path / "c" / "last.pt")["epoch"] == 3 and load(b / "last.pt")["epoch"] == 2


def test_help_lists_every_config_key(capsys):
    """train.py --help (in this process): every key of configs/default.yaml with its default and its comment,
    the decoders of the registry among the choices."""
    from config import default_config, resolve_config
    with pytest.raises(SystemExit) as e:
        resolve_config(["--help"], usage="train.py's usage")
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "train.py's usage" in out
    for key in default_config():
        assert f"--{key} " in out, key
    assert "doubly stochastic attention regularisation" in out  # the comments come along
    assert " | ".join(DECODERS) in out


def test_early_stopping(tmp_path, shapes_data):
    # A learning rate too small to change any caption: BLEU-4 stays put after the first epoch.
    # (attention: no BatchNorm statistics in the decoder to move the validation loss either)
    r = train(tmp_path / "run", shapes_data, decoder="attention", epochs=6, patience=2, decoder_lr=1e-12)
    assert r.returncode == 0, r.stderr
    epochs = log_records(tmp_path / "run", "epoch")
    assert len(epochs) == 3 and [e["best"] for e in epochs] == [True, False, False]
    assert "early stop" in r.stdout
    # the epoch line marks the metric that picks best.pt (train_args' early_stop_metric, or BLEU-4)
    first = next(line for line in r.stdout.splitlines() if line.startswith("epoch 1:"))
    assert re.search(r"(val loss|BLEU-4) [\d.]+ \(best\),", first) and first.count("(best)") == 1


def test_every_shipped_config_loads():
    """Each configs/*.yaml only uses known keys with the right types."""
    import os

    from config import default_config, merge_config, read_yaml
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
    a, b = log_records(tmp_path / "encode"), log_records(tmp_path / "cached")
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


# ----------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def run(shapes_data, tmp_path_factory):
    """A finished one-epoch attention run."""
    out = tmp_path_factory.mktemp("bad") / "run"
    r = run_script("train.py", *train_args(out, shapes_data, decoder="attention", epochs=1))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("override,needles", [
    ({"decoder": "lstm"}, (f"decoder must be one of {', '.join(DECODERS)}", "lstm")),
    ({"decoder": "transformer", "attention": "hard"}, ("only the attention decoder does", "transformer")),
    ({"decoder": "transformer", "max_decode_len": 70}, ("max_decode_len 70 needs 71 word positions",)),
    ({"batch_size": 0}, ("batch_size", ">= 1")),
    ({"batch_size": -4}, ("batch_size", "-4")),
    ({"bacth_size": 4}, ("unknown config key", "bacth_size", "did you mean 'batch_size'?")),
    ({"epochs": "two"}, ("epochs must be int",)),
    ({"decoder_lr": 0}, ("decoder_lr", "> 0")),
])
def test_train_bad_setting(tmp_path, shapes_data, override, needles):
    refused(train(tmp_path / "run", shapes_data, **{"epochs": 1, **override}), *needles)
    assert files(tmp_path / "run") == {}


@pytest.mark.parametrize("text,needles", [
    ("decoder: rnn\nlearning_rate: 0.1\n", ("bad.yaml", "learning_rate")),
    ("decoder: rnn\nepochs: ten\n", ("bad.yaml", "epochs must be int")),
    ("decoder: [rnn\n", ("bad.yaml", "not valid YAML")),
    ("- a list\n", ("bad.yaml", "key: value")),
])
@pytest.mark.slow
def test_train_bad_yaml(tmp_path, text, needles):
    (tmp_path / "bad.yaml").write_text(text)
    refused(run_script("train.py", "--config", tmp_path / "bad.yaml"), *needles)


def test_train_missing_data_folder_and_checkpoint(tmp_path, shapes_data):
    refused(train(tmp_path / "run", tmp_path / "nowhere", epochs=1), "nowhere")
    refused(run_script("train.py", "--resume", tmp_path / "nope.pt"), "nope.pt", "not found")
    refused(run_script("train.py", "--config", tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_train_keeps_another_runs_folder(run, shapes_data):
    before = files(run)
    refused(train(run, shapes_data, epochs=1), "already holds a run", "--overwrite")
    assert files(run) == before


def test_train_word_map_without_special_tokens(tmp_path, shapes_data):
    words = copy_data(shapes_data, tmp_path / "data")
    wm = json.loads(words.read_text())
    del wm["<start>"]
    words.write_text(json.dumps(wm))
    refused(train(tmp_path / "run", tmp_path / "data", epochs=1), words.name, "<start>")


def test_resume_refuses_another_vocabulary_decoder_or_encoder(run, tmp_path, shapes_data):
    before = files(run)
    words = copy_data(shapes_data, tmp_path / "data")
    wm = json.loads(words.read_text())
    wm["zebra"] = len(wm)
    words.write_text(json.dumps(wm))
    refused(run_script("train.py", "--resume", run / "last.pt", "--data_folder", tmp_path / "data"), "word map",
            f"({len(wm) - 1} words)", f"({len(wm)} words)")
    refused(run_script("train.py", "--resume", run / "last.pt", "--decoder", "rnn"), "decoder", "'attention'", "'rnn'")
    refused(run_script("train.py", "--resume", run / "last.pt", "--encoder", "resnet34"), "'resnet18'", "'resnet34'")
    assert files(run) == before


def test_resume_refuses_a_checkpoint_without_training_state(tmp_path, run):
    ckpt = torch.load(run / "best.pt", weights_only=True)
    del ckpt["samples"]  # as in a checkpoint of an older train.py
    torch.save(ckpt, tmp_path / "old.pt")
    refused(run_script("train.py", "--resume", tmp_path / "old.pt"), "old.pt", "cannot be resumed", "'samples'")


def test_malicious_checkpoint_runs_no_code(tmp_path, run):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")  # unpickling would create the file
    evil = tmp_path / "evil.pt"
    torch.save({"config": {}, "payload": Payload()}, evil)
    torch.load(evil, weights_only=False)  # the unsafe way really runs it ...
    assert marker.exists()
    marker.unlink()
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    for r in (run_script("eval.py", "--checkpoint", evil),  # ... every script here refuses it
              run_script("caption.py", "--checkpoint", evil, "--folder", tmp_path / "in", "--out", tmp_path / "o"),
              run_script("train.py", "--resume", evil)):
        refused(r, "evil.pt", "is not a checkpoint of this repository", "io.open")
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_a_damaged_checkpoint_is_said_to_be_in_a_whole_sentence(tmp_path):
    """`head -c 1000 best.pt > bad.pt`: damaged or incomplete, what to do, and torch's sentence uncut."""
    torch.save({"config": {}, "weights": torch.zeros(1000)}, tmp_path / "best.pt")
    (tmp_path / "bad.pt").write_bytes((tmp_path / "best.pt").read_bytes()[:1000])
    (tmp_path / "last.pt").write_bytes(b"")
    with pytest.raises(InputError) as e:
        load_checkpoint(str(tmp_path / "bad.pt"))
    assert str(e.value) == (f"{tmp_path / 'bad.pt'} is damaged or incomplete (RuntimeError: PytorchStreamReader "
                            "failed reading zip archive: failed finding central directory): copy it again, or use "
                            "the last.pt of the same run folder")
    with pytest.raises(InputError, match=r"last.pt is damaged or incomplete \(EOFError\): .* use the best.pt"):
        load_checkpoint(str(tmp_path / "last.pt"))


def test_grouped_batches_need_a_multiple_of_the_captions_per_image(tmp_path, shapes_data):
    refused(train(tmp_path / "run", shapes_data, epochs=1, group_by_image="true"), "group_by_image",
            "multiple of the 5 captions per image", "batch_size 8")
    r = train(tmp_path / "rnn", shapes_data, decoder="rnn", epochs=1, **GROUPED)
    assert r.returncode == 0, r.stderr
    assert "BatchNorm (its initial state) normalises over 4 images per batch, not 8" in r.stdout


def test_resume_says_what_is_left_and_what_changed(trained, tmp_path, monkeypatch, capsys):
    """A finished run resumed as it is says there is nothing left to train; resumed with more epochs and
    another warm-up, it names the changed keys and the learning rate's jump (docs/troubleshooting.md)."""
    import train as train_script
    from utils import run_cli
    run = tmp_path / "run"
    shutil.copytree(trained("transformer").parent, run)

    def resume(*argv):
        monkeypatch.setattr(sys, "argv", ["train.py", "--resume", str(run / "last.pt"), *map(str, argv)])
        run_cli(train_script.main)
        return capsys.readouterr().out

    out = resume()
    assert f"nothing left to train in {run}: it has trained all its 12 epochs; give a larger --epochs" in out
    assert "done:" not in out and "changed keys" not in out
    step = load(run / "last.pt")["step"]
    out = resume("--epochs", 13, "--transformer_warmup", 50, "--decoder_lr", 1)
    assert (f"resumed at step {step} with changed keys, which apply from here on: transformer_warmup 4 -> 50, epochs "
            "12 -> 13, decoder_lr 0.005 -> 1.0") in out
    assert "decoder_lr does not change a resumed run: the optimiser keeps the checkpoint's base rate 0.005" in out
    before, after = (5e-3 * min((step + 1) / w, math.sqrt(w / (step + 1))) for w in (4, 50))
    assert f"at step {step} the rate goes from {before:.3g} to {after:.3g} at once" in out
    assert "done: 13 epochs" in out


def test_a_fourth_decoder_is_one_class_and_a_registry_line(shapes_data, tmp_path, monkeypatch, capsys):
    """A throwaway decoder, registered in models.DECODERS and nowhere else, trains, resumes, decodes (greedy
    and beam), is evaluated and captions through the Python API: nothing outside the class knows names."""
    import eval as ev
    import train as train_script
    from torch import nn

    import models
    from captioner import Captioner
    from decoders import Decoder
    from utils import run_cli

    class Bag(Decoder):
        """The next word from the mean of the cells and the previous word, nothing else."""
        image_state = ("image",)

        def __init__(self, vocab_size, encoder_dim, dim):
            super().__init__()
            self.embedding, self.image, self.fc = nn.Embedding(vocab_size, dim), nn.Linear(encoder_dim, dim), \
                nn.Linear(dim, vocab_size)

        @classmethod
        def build(cls, model, vocab_size, encoder_dim, dropout):
            return cls(vocab_size, encoder_dim, model.emb_dim)

        def init_state(self, features):
            return {"image": self.image(features.mean(1))}  # B x dim

        def step(self, prev_words, state, features):  # state["image"]: one row per image, for its k words
            image = state["image"].repeat_interleave(len(prev_words) // len(state["image"]), 0)
            return self.fc(torch.tanh(image + self.embedding(prev_words))), state, None

        def forward(self, features, captions, lengths, maps=True):
            k = captions.size(0) // features.size(0)  # captions per image
            image = self.image(features.mean(1)).repeat_interleave(k, 0)[:, None]  # B x 1 x dim
            return self.fc(torch.tanh(image + self.embedding(captions[:, : int(lengths.max()) - 1]))), None

    monkeypatch.setitem(models.DECODERS, "bag", Bag)
    out = tmp_path / "bag"

    def main(module, *argv):
        monkeypatch.setattr(sys, "argv", [module.__file__, *map(str, argv)])
        run_cli(module.main)
        return capsys.readouterr().out

    main(train_script, *train_args(out, shapes_data, decoder="bag", epochs=2, max_steps=5, decoder_lr=1e-2))
    assert "done: 2 epochs" in main(train_script, "--resume", out / "last.pt", "--max_steps", 0)
    assert load(out / "best.pt")["model"]["decoder"] == "bag"
    main(ev, "--checkpoint", out, "--beam-size", 1, 3, "--workers", 0)
    scored = json.loads((out / "eval_TEST.json").read_text())
    assert scored["decoder"] == "bag" and sorted(scored["results"]) == ["beam1", "beam3"]
    assert "pointing" not in scored["results"]["beam3"]  # no maps: nothing to point with
    (caption,) = Captioner(out, "cpu").caption([np.zeros((32, 32, 3), np.uint8)], beam_size=2)
    assert caption.alphas is None and len(caption.words) <= 20


def test_batches_of_one_length_weigh_each_word_as_random_batches_do(monkeypatch):
    """length_pool: a batch's loss is divided by its captions x TRAIN's mean tokens a caption (what a
    random batch holds on average), not by its own tokens, which would weigh a batch of short captions'
    words more; without it, by its own tokens as ever."""
    import bench
    import train as train_module
    from config import default_config, merge_config
    from datasets import TrainItem
    cfg = merge_config(default_config(), {**models.TINY, "encoder_weights": "none", "device": "cpu"}, "test")
    word_map = bench.word_map_of(20)
    run = train_module.build_run(cfg, word_map, 32, torch.device("cpu"))
    seen, objective = [], run.objective
    monkeypatch.setattr(run, "objective", lambda batch, step: (seen.append(step), objective(batch, step))[1])
    lengths = torch.tensor([5, 4, 5, 3])  # 13 words after <start>
    captions = torch.randint(1, 15, (4, 7))
    batch = TrainItem(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), captions, lengths, torch.arange(4))
    train_module.train_step(run, [batch], contextlib.nullcontext())
    run.mean_tokens = 9.5
    train_module.train_step(run, [batch], contextlib.nullcontext())
    assert [(float(s.tokens), float(s.captions)) for s in seen] == [(13.0, 4.0), (38.0, 4.0)]
