"""eval.py and caption.py end to end on tiny trained checkpoints."""
import json
import math

import pytest
from PIL import Image

from tests.conftest import page_data, photos, run_script

pytestmark = pytest.mark.slow  # every test here runs scripts in subprocesses


@pytest.mark.parametrize("decoder", ["rnn", "attention"])
def test_eval(trained, tmp_path, decoder):
    out = tmp_path / "res" / "eval.json"
    r = run_script("eval.py", "--checkpoint", trained(decoder), "--beam-size", 1, 3, "--out", out, "--attention-maps")
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
        check_per_image(json.loads((out.parent / res["images_file"]).read_text()), captions, res, decoder)
    assert "BLEU-4" in r.stdout and "CIDEr" in r.stdout
    assert ("the plain decoder, which has no attention maps" in r.stdout) == (decoder == "rnn")
    # shapes images have 6 captions, 5 of them encoded: coco-caption used all 6
    assert report["references"] == {"kind": "raw", "per_image_min": 6, "per_image_max": 6, "per_image_mean": 6.0}
    assert report["nltk_bleu4_references"] == "encoded" and "against the raw references" in r.stdout


def check_per_image(table, captions, res, decoder):
    """eval.py's per-image file agrees with its captions file and its corpus numbers."""
    import base64
    rows = table["images"]
    assert [r["caption"] for r in rows] == [c["caption"] for c in captions]
    assert [r["index"] for r in rows] == list(range(6)) and table["beam_size"] in (1, 3)
    assert sum(r["CIDEr"] for r in rows) / 6 == pytest.approx(res["CIDEr"], abs=1e-9)
    assert sum(r["exact_match"] for r in rows) / 6 == pytest.approx(res["exact_match"])
    assert all(r["describes_scene"] == (not any(r["scene_errors"].values())) for r in rows)
    if decoder == "rnn":
        assert table["attention_grid"] is None and not any("attention" in r or "pointing" in r for r in rows)
        return
    grid = table["attention_grid"]
    assert grid == 4  # the TINY encoder's grid
    counted = [p for r in rows for p in r["pointing"] if p is not None]
    assert len(counted) == res["pointing_words"] and sum(counted) / len(counted) == pytest.approx(res["pointing"])
    for r in rows:
        maps = base64.b64decode(r["attention"])
        assert len(maps) == len(r["caption"].split()) * grid * grid == len(r["pointing"]) * grid * grid
        assert all(max(maps[k:k + grid * grid]) == 255 for k in range(0, len(maps), grid * grid))


def test_eval_without_a_references_file_uses_the_encoded_ones(trained, shapes_data, tmp_path):
    """Data prepared elsewhere (the tutorial) has no REFS file: eval says so and scores against the
    encoded references; nltk BLEU-4 is the same either way."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data, ignore=shutil.ignore_patterns("*_REFS_*", "cache"))
    runs = {}
    for name, folder in (("raw", shapes_data), ("encoded", data)):
        out = tmp_path / name / "eval.json"
        r = run_script("eval.py", "--checkpoint", trained("rnn"), "--beam-size", 1, "--data-folder", folder,
                       "--out", out)
        assert r.returncode == 0, r.stderr
        runs[name] = json.loads(out.read_text())
        assert ("note: no TEST_REFS file" in r.stdout) == (name == "encoded")
    assert runs["encoded"]["references"]["kind"] == "encoded" and runs["encoded"]["references"]["per_image_max"] == 5
    raw, encoded = runs["raw"]["results"]["beam1"], runs["encoded"]["results"]["beam1"]
    assert raw["nltk BLEU-4"] == encoded["nltk BLEU-4"] and raw["CIDEr"] != encoded["CIDEr"]


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


def test_caption_html_page(trained, tmp_path):
    """caption.py --html: one self-contained page with each image, its caption and, for the attention
    decoder, every word's map; a folder given as the page is refused."""
    import base64
    page = tmp_path / "page" / "captions.html"
    r = run_script("caption.py", "--checkpoint", trained("attention"), "--folder", photos(tmp_path / "in", 3),
                   "--out", tmp_path / "png", "--html", page, "--beam-size", 2)
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and 'src="' not in text  # nothing from elsewhere
    data = page_data(text)
    printed = dict(line.split(": ", 1) for line in r.stdout.splitlines() if line.startswith(str(tmp_path / "in")))
    assert data["runs"][0]["grid"] == 4 and len(data["images"]) == 3
    for image in data["images"]:
        cap = image["caps"][0]
        assert image["src"].startswith("data:image/") and printed[image["title"]] == cap["caption"]
        assert len(base64.b64decode(cap["attention"])) == len(cap["caption"].split()) * 16
    r = run_script("caption.py", "--checkpoint", trained("rnn"), "--image", tmp_path / "in" / "photo0.jpg",
                   "--out", tmp_path / "png2", "--html", tmp_path)
    assert r.returncode != 0 and "is a folder" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_caption_plain_decoder_and_single_file(trained, tmp_path):
    src = photos(tmp_path / "in", 1)
    r = run_script("caption.py", "--checkpoint", trained("rnn"), "--image", src / "photo0.jpg",
                   "--out", tmp_path / "one.png")
    assert r.returncode == 0, r.stderr
    assert Image.open(tmp_path / "one.png").size == (200, 200)


def test_python_captioner_takes_paths_pil_images_and_arrays(trained, tmp_path):
    """captioner.Captioner: the same captions as caption.py for a path, a Pillow image and a uint8 array."""
    import numpy as np

    from captioner import Captioner
    src = photos(tmp_path / "in", n=2)
    paths = sorted(str(p) for p in src.iterdir())
    r = run_script("caption.py", "--checkpoint", trained("attention"), "--folder", src, "--beam-size", 3,
                   "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    printed = [line.split(": ", 1)[1] for line in r.stdout.splitlines() if line.startswith(str(src))]
    captioner = Captioner(trained("attention"), device="cpu")
    pil = Image.open(paths[1])
    array = np.asarray(Image.open(paths[0]))  # H x W x 3
    for images in (paths, [array, pil], [array.transpose(2, 0, 1), pil]):
        out = captioner.caption(images, beam_size=3)
        assert [" ".join(c.words) for c in out] == printed
        assert all(c.alphas.shape == (len(c.words), 16) and math.isfinite(c.score) for c in out)
    assert captioner.caption(paths, beam_size=1, max_len=2)[0].words.__len__() <= 2


def test_a_tutorial_checkpoint_is_named_as_such(tmp_path):
    """sgrvinod's tutorial pickles whole models: say what the file is, without torch's colour codes."""
    import torch

    import models
    cls = type("DecoderWithAttention", (torch.nn.Module,), {"__module__": "models"})
    models.DecoderWithAttention = cls  # where the tutorial's class lives, so that pickle can name it
    try:
        torch.save({"epoch": 3, "decoder": cls(), "bleu-4": 0.2}, tmp_path / "BEST_checkpoint.pth.tar")
    finally:
        del models.DecoderWithAttention
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    for r in (run_script("caption.py", "--checkpoint", tmp_path / "BEST_checkpoint.pth.tar", "--folder",
                         tmp_path / "in"),
              run_script("eval.py", "--checkpoint", tmp_path / "BEST_checkpoint.pth.tar")):
        assert r.returncode == 2
        (line,) = r.stderr.splitlines()
        assert "pickled model objects (models.DecoderWithAttention)" in line and "tutorial" in line
        assert "train here" in line and "\x1b" not in line
