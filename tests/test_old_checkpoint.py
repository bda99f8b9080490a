"""A checkpoint written before ModelConfig had the Transformer's fields (and before the optimiser's groups
kept a base rate) still loads everywhere: Captioner, caption.py, eval.py and a resume.

tests/fixtures/checkpoint-8453d0a.pt was written by train.py at commit 8453d0a (a tiny attention model,
3 steps on the shapes_data fixture's data: 64 scenes, min word frequency 0, the one-stage encoder)."""
import os
import shutil

import caption
import eval as evaluate
from captioner import Captioner
from tests.helpers import ROOT, load, photos, run_main, run_script

OLD = os.path.join(ROOT, "tests", "fixtures", "checkpoint-8453d0a.pt")


def test_it_predates_the_new_fields():
    ckpt = load(OLD)
    assert "transformer_layers" not in ckpt["model"] and "transformer_layers" not in ckpt["config"]
    assert "attend_after_word" not in ckpt["model"]  # nor attention-maps.md's options: they load as the paper's
    assert all("base_lr" not in g for g in ckpt["decoder_optimizer"]["param_groups"])


def test_captioner_and_caption_py(tmp_path, monkeypatch, capsys):
    folder = photos(tmp_path / "photos", 2)
    captions = Captioner(OLD, "cpu").caption([folder / "photo0.jpg"], beam_size=3, max_len=6)
    assert captions[0].alphas.shape == (len(captions[0].words), 16)
    code, err = run_main(caption, ["--checkpoint", OLD, "--folder", folder, "--out", tmp_path / "out",
                                   "--max-len", 6], monkeypatch, capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == ["photo0.png", "photo1.png"]


def test_eval_and_resume(shapes_data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(OLD, run / "last.pt")
    code, err = run_main(evaluate, ["--checkpoint", run / "last.pt", "--data-folder", shapes_data, "--beam-size", 1,
                                    "--max-len", 6, "--workers", 0], monkeypatch, capsys)
    assert code == 0, err
    r = run_script("train.py", "--resume", run / "last.pt", "--data_folder", shapes_data, "--epochs", 1,
                   "--val_max_images", 2)
    assert r.returncode == 0, r.stderr
    ckpt = load(run / "last.pt")
    assert ckpt["step"] > 3 and ckpt["model"]["transformer_layers"] == 3  # the default.yaml value, now written
    assert all(g["base_lr"] == g["lr"] for g in ckpt["decoder_optimizer"]["param_groups"])  # no warm-up
