"""eval.py and caption.py end to end on tiny trained checkpoints."""
import json
import math

import pytest
from PIL import Image

from tests.conftest import photos, run_script

pytestmark = pytest.mark.slow  # every test here runs scripts in subprocesses


@pytest.mark.parametrize("decoder", ["rnn", "attention"])
def test_eval(trained, tmp_path, decoder):
    out = tmp_path / "res" / "eval.json"
    r = run_script("eval.py", "--checkpoint", trained(decoder), "--beam-size", 1, 3, "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 6 and report["split"] == "TEST" and report["decoder"] == decoder
    for k in (1, 3):
        res = report["results"][f"beam{k}"]
        for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "nltk BLEU-4"):
            assert 0 <= res[metric] <= 10
        assert res["images_per_s"] > 0
        assert ("pointing" in res) == (decoder == "attention")
        captions = json.loads((out.parent / res["captions_file"]).read_text())
        assert sorted(c["image_id"] for c in captions) == list(range(6))
        assert all(isinstance(c["caption"], str) and "<end>" not in c["caption"] for c in captions)
    assert "BLEU-4" in r.stdout and "CIDEr" in r.stdout


def test_eval_decoding_benchmark(trained):
    r = run_script("eval.py", "--checkpoint", trained("attention"), "--benchmark-decoding", 6, "--beam-size", 3)
    assert r.returncode == 0, r.stderr
    assert "True" in r.stdout.splitlines()[-1]  # batched and one-at-a-time captions agree



def test_caption_attention_panels(trained, tmp_path):
    src = photos(tmp_path / "in")
    r = run_script("caption.py", "--checkpoint", trained("attention"), "--folder", src, "--out", tmp_path / "out",
                   "--beam-size", 3)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(str(src))]
    assert len(lines) == 2
    for i, line in enumerate(lines):
        words = line.split(": ", 1)[1].split()
        panels = len(words) + 1  # the image, then one panel per word
        png = Image.open(tmp_path / "out" / f"photo{i}.png")
        assert png.size == (min(panels, 6) * 200, math.ceil(panels / 6) * 200)
        assert png.info["Description"] == f"{panels} panels"


def test_caption_plain_decoder_and_single_file(trained, tmp_path):
    src = photos(tmp_path / "in", 1)
    r = run_script("caption.py", "--checkpoint", trained("rnn"), "--image", src / "photo0.jpg",
                   "--out", tmp_path / "one.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "one.png").size == (200, 200)
