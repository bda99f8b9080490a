"""pretrain_encoder.py, and the shortened demo: trained runs -> eval -> compare.py's report."""
import json
import shutil

import pytest
import torch

from models import Encoder
from tests.conftest import ENCODER, page_data, run_script, train_args

pytestmark = pytest.mark.slow  # every test here runs scripts in subprocesses


def test_pretrained_encoder_loads_and_learnt(shapes_data):
    report = json.loads((shapes_data / ENCODER.replace(".pt", ".json")).read_text())
    assert report["held_out_loss_after"] < report["held_out_loss_before"]
    assert set(report["held_out_accuracy"]) >= {"colour", "shape", "size"}
    enc = Encoder("resnet18", str(shapes_data / ENCODER), encoded_size=4, stages=1)
    state = torch.load(shapes_data / ENCODER, weights_only=True)
    torch.testing.assert_close(enc.net.conv1.weight, state["conv1.weight"])


def test_shortened_demo_report(trained, tmp_path, shapes_data):
    runs = []
    for decoder in ("rnn", "attention"):
        run = tmp_path / decoder
        shutil.copytree(trained(decoder).parent, run)
        r = run_script("eval.py", "--checkpoint", run / "best.pt", "--beam-size", 1, 3)
        assert r.returncode == 0, r.stderr
        runs.append(run)
    # a third run that stopped early and was never evaluated
    stopped = tmp_path / "stopped"
    r = run_script("train.py", *train_args(stopped, shapes_data, decoder="attention", epochs=5, patience=1,
                                           decoder_lr=1e-12))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "report"
    r = run_script("compare.py", *runs, stopped, "--out", out)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    for run in runs:  # the report's numbers are the eval results it read
        results = json.loads((run / "eval_TEST.json").read_text())["results"]
        for beam in ("beam1", "beam3"):
            for metric in ("BLEU-4", "CIDEr", "ROUGE-L"):
                assert f"{results[beam][metric]:.4f}" in report, (run.name, beam, metric)
    assert "**stopped (attention): no eval results yet**" in report
    assert "stopped (attention) stopped early after 2 of 5 epochs" in report
    assert "margin attention - rnn" in report and "margin stopped - rnn" in report
    for png in ("curves.png", "metrics.png", "attention.png"):
        assert (out / png).stat().st_size > 1000
    page = (out / "report.html").read_text()
    data = page_data(page)
    assert [r["name"] for r in data["runs"]] == ["rnn", "attention"] and len(data["images"]) == 6
    assert data["runs"][1]["grid"] is None  # evaluated without --attention-maps
    for run, name in zip(runs, ("rnn", "attention"), strict=True):  # the beam-3 captions and CIDEr eval.py kept
        rows = json.loads((run / "eval_TEST_images_beam3.json").read_text())["images"]
        k = data["runs"].index(next(r for r in data["runs"] if r["name"] == name))
        assert [im["caps"][k]["caption"] for im in data["images"]] == [r["caption"] for r in rows]
        assert [im["caps"][k]["CIDEr"] for im in data["images"]] == [r["CIDEr"] for r in rows]
    assert "Browse the 6 TEST images" in page and "[report.html](report.html#browse)" in report
    r = run_script("compare.py", *runs, "--out", tmp_path / "first4", "--browse-images", 4, "--thumb-size", 32)
    assert r.returncode == 0, r.stderr
    assert "Browse the 4 TEST images" in (tmp_path / "first4" / "report.html").read_text()
    assert "a browser of the first 4 TEST images" in (tmp_path / "first4" / "report.md").read_text()
    # results from an eval.py without per-image files: the report, no browser, and what to do
    for f in runs[0].glob("eval_TEST_images_*.json"):
        f.unlink()
    r = run_script("compare.py", *runs, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "No browser of the TEST images in report.html: rnn: no per-image results at beam 3: evaluate again" in (
        out / "report.md").read_text()
    assert 'id="data"' not in (out / "report.html").read_text()


def test_compare_refuses_a_folder_without_a_run(tmp_path, trained):
    r = run_script("compare.py", trained("rnn").parent, tmp_path, "--out", tmp_path / "r")
    assert r.returncode == 2 and "config.yaml" in r.stderr
