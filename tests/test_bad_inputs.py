"""Every bad input a user can give, in one place. Each case checks the exit status (2), one `error:` line
that names the culprit, no traceback, no partial output, and that files already there are untouched."""
import errno
import json
import os
import shutil
import struct
import sys
import zlib

import h5py
import pytest
import torch
from PIL import Image

import create_input_files
from datasets import base_name
from tests.conftest import SHAPES_NAME, SIZE, photos, prepare, prepare_coco, run_script, train, train_args
from tests.fixtures import make_karpathy
from utils import run_cli

NAME = base_name("coco", 5, 0)


def refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if "error:" in ln]  # argparse's: "eval.py: error: ..."
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def files(folder):
    """Name -> bytes of every file under folder (empty when it does not exist)."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def bomb_png(path, width=20000, height=10000):
    """A tiny PNG whose header claims 200 M pixels, over twice Pillow's decompression-bomb limit."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- data preparation

@pytest.fixture
def src(tmp_path):
    make_karpathy(tmp_path, num_images=8, dataset="coco")
    return tmp_path


def edit_json(src, change):
    path = src / "dataset_coco.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_prepare_missing_json(src):
    (src / "dataset_coco.json").unlink()
    refused(prepare_coco(src, src / "out"), "dataset_coco.json", "not found")
    assert files(src / "out") == {}


def test_prepare_json_that_is_not_json(src):
    (src / "dataset_coco.json").write_text("{not json")
    refused(prepare_coco(src, src / "out"), "dataset_coco.json", "not JSON")
    assert files(src / "out") == {}


def test_prepare_json_without_images(src):
    (src / "dataset_coco.json").write_text('{"annotations": []}')
    refused(prepare_coco(src, src / "out"), "'images'")


def test_prepare_entry_without_a_key(src):
    edit_json(src, lambda d: d["images"][3].pop("filepath"))
    refused(prepare_coco(src, src / "out"), "image 3", "'filepath'")
    assert files(src / "out") == {}


def test_prepare_unknown_split_name(src):
    def change(d):
        d["images"][2]["split"] = "training"
    edit_json(src, change)
    refused(prepare_coco(src, src / "out"), "image 2", "'training'")


def test_prepare_empty_split(src):
    def change(d):
        for e in d["images"]:
            e["split"] = "train" if e["split"] == "test" else e["split"]
    edit_json(src, change)
    refused(prepare_coco(src, src / "out"), "split TEST")
    assert files(src / "out") == {}


def test_prepare_missing_image_folder(src):
    r = prepare("--dataset", "coco", "--karpathy-json", src / "dataset_coco.json",
                "--image-folder", src / "nowhere", "--output-folder", src / "out")
    refused(r, "nowhere")


def test_prepare_missing_image_refused_or_skipped(src):
    (src / "images" / "val2014" / "img_00003.jpg").unlink()
    refused(prepare_coco(src, src / "out"), "img_00003.jpg", "not found")
    assert files(src / "out") == {}
    r = prepare_coco(src, src / "out", "--skip-bad-images")
    assert r.returncode == 0, r.stderr
    assert "img_00003.jpg" in (src / "out" / f"SKIPPED_IMAGES_{NAME}.txt").read_text()


def test_prepare_truncated_image_refused_or_skipped(src):
    path = src / "images" / "train2014" / "img_00000.jpg"
    path.write_bytes(path.read_bytes()[:300])
    refused(prepare_coco(src, src / "out", "--workers", 2), "img_00000.jpg", "--skip-bad-images")
    assert files(src / "out") == {}  # the images of VAL and TEST were never renamed into place
    r = prepare_coco(src, src / "out", "--skip-bad-images")
    assert r.returncode == 0, r.stderr
    with h5py.File(src / "out" / f"TRAIN_IMAGES_{NAME}.hdf5", "r") as h:
        assert h["images"].shape[0] == 3  # train + restval: 4 images, one skipped
    skipped = (src / "out" / f"SKIPPED_IMAGES_{NAME}.txt").read_text()
    assert "img_00000.jpg" in skipped and skipped.count("\n") == 1 and "skipped 1" in r.stdout


@pytest.mark.parametrize("kind", ["zero-byte", "corrupt", "decompression bomb"])
def test_prepare_unreadable_image(src, kind):
    path = src / "images" / "val2014" / "img_00005.png"
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "corrupt":
        path.write_bytes(os.urandom(2000))
    else:
        bomb_png(path)
    refused(prepare_coco(src, src / "out"), "img_00005.png", "cannot read image")
    assert files(src / "out") == {}


def test_prepare_keeps_existing_outputs(src):
    out = src / "out"
    assert prepare_coco(src, out).returncode == 0
    before = files(out)
    refused(prepare_coco(src, out), "already exists", "--overwrite")
    (src / "images" / "val2014" / "img_00005.png").write_bytes(b"garbage")
    refused(prepare_coco(src, out, "--overwrite"), "img_00005.png")  # a failed --overwrite changes nothing
    assert files(out) == before


def test_prepare_bad_arguments(src):
    r = prepare("--dataset", "coco", "--output-folder", src / "out")
    assert r.returncode == 2 and "--karpathy-json" in r.stderr
    r = prepare_coco(src, src / "out", "--captions-per-image", 0)
    assert r.returncode == 2 and "--captions-per-image" in r.stderr


def test_prepare_full_disk_while_writing_hdf5(src, monkeypatch, capsys):
    out = src / "out"
    assert prepare_coco(src, out).returncode == 0
    before = files(out)

    def full(self, key, value):
        raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, error message = "
                                    "'No space left on device')")
    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    monkeypatch.setattr(sys, "argv", ["create_input_files.py", "--dataset", "coco", "--karpathy-json",
                                      str(src / "dataset_coco.json"), "--image-folder", str(src / "images"),
                                      "--output-folder", str(out), "--min-word-freq", "0", "--image-size",
                                      str(SIZE), "--workers", "1", "--overwrite"])
    with pytest.raises(SystemExit) as exit:
        run_cli(create_input_files.main)
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "no space left" in err and "IMAGES" in err
    assert files(out) == before


# ----------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def run(shapes_data, tmp_path_factory):
    """A finished one-epoch attention run."""
    out = tmp_path_factory.mktemp("bad") / "run"
    r = run_script("train.py", *train_args(out, shapes_data, decoder="attention", epochs=1))
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("override,needles", [
    ({"decoder": "transformer"}, ("decoder", "transformer")),
    ({"batch_size": 0}, ("batch_size", ">= 1")),
    ({"batch_size": -4}, ("batch_size", "-4")),
    ({"bacth_size": 4}, ("unknown config key", "bacth_size")),
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


def copy_data(shapes_data, folder):
    folder.mkdir()
    for f in shapes_data.glob(f"*_{SHAPES_NAME}.*"):
        shutil.copy(f, folder / f.name)
    return folder / f"WORDMAP_{SHAPES_NAME}.json"


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
        refused(r, "evil.pt", "not a loadable checkpoint")
    assert not marker.exists() and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- eval and caption

def test_eval_split_not_prepared_and_other_vocabulary(trained, tmp_path, shapes_data):
    ckpt = trained("rnn")
    copy_data(shapes_data, tmp_path / "data")
    for f in (tmp_path / "data").glob("VAL_*"):
        f.unlink()
    refused(run_script("eval.py", "--checkpoint", ckpt, "--split", "VAL", "--data_folder", tmp_path / "data"),
            "VAL", "not prepared")
    refused(run_script("eval.py", "--checkpoint", ckpt, "--data_folder", tmp_path), "WORDMAP")
    refused(run_script("eval.py", "--checkpoint", ckpt, "--beam-size", 0), "beam")
    assert not list(ckpt.parent.glob("eval_*"))


def test_caption_refusals(trained, tmp_path):
    ckpt = trained("rnn")
    (tmp_path / "notes.txt").write_text("not an image")
    refused(run_script("caption.py", "--checkpoint", ckpt, "--image", tmp_path / "notes.txt"), "notes.txt")
    refused(run_script("caption.py", "--checkpoint", ckpt, "--image", tmp_path / "gone.jpg"), "gone.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    refused(run_script("caption.py", "--checkpoint", ckpt, "--folder", tmp_path / "empty"), "no images", "empty")
    refused(run_script("caption.py", "--checkpoint", ckpt, "--folder", tmp_path / "absent"), "absent", "not found")
    bomb_png(tmp_path / "huge.png")
    refused(run_script("caption.py", "--checkpoint", ckpt, "--image", tmp_path / "huge.png", "--out",
                       tmp_path / "out"), "huge.png", "DecompressionBomb")
    bad = torch.load(ckpt, weights_only=True)
    bad["word_map"]["zebra"] = len(bad["word_map"])
    torch.save(bad, tmp_path / "mixed.pt")
    src = photos(tmp_path / "in", 1)
    refused(run_script("caption.py", "--checkpoint", tmp_path / "mixed.pt", "--folder", src, "--out",
                       tmp_path / "out"), "vocabular")
    assert not (tmp_path / "out").exists() and not (tmp_path / "captions").exists()


def test_caption_takes_every_image_mode(trained, tmp_path):
    """CMYK, 16-bit, RGBA, palette and grey photos are not errors: they are converted."""
    from tests.fixtures import MODES, extension, save_image
    (tmp_path / "in").mkdir()
    for i, mode in enumerate(MODES):
        save_image(tmp_path / "in" / f"{i}_{mode.replace(';', '')}{extension(mode)}", i, mode, 40, 30)
    r = run_script("caption.py", "--checkpoint", trained("rnn"), "--folder", tmp_path / "in", "--out",
                   tmp_path / "out", "--beam-size", 2)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "out")) == len(MODES)
