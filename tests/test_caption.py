"""caption.py and the Python API (captioner.Captioner) on tiny trained checkpoints."""
import base64
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import ROOT, bomb_png, page_data, photos, refused, run_main, run_script


@pytest.mark.parametrize("decoder", ["attention", "transformer"])
def test_caption_attention_panels(trained, tmp_path, decoder):
    src = photos(tmp_path / "in")
    r = run_script("caption.py", "--checkpoint", trained(decoder), "--folder", src, "--out", tmp_path / "out",
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


def test_caption_refusals(trained, tmp_path, monkeypatch, capsys):
    import caption

    def run(*argv):  # in this process: the same exit code and stderr as the command line, without a start-up
        code, err = run_main(caption, argv, monkeypatch, capsys)
        return subprocess.CompletedProcess(argv, code, "", err)
    ckpt = trained("rnn")
    (tmp_path / "notes.txt").write_text("not an image")
    refused(run("--checkpoint", ckpt, "--image", tmp_path / "notes.txt"), "notes.txt")
    refused(run("--checkpoint", ckpt, "--image", tmp_path / "gone.jpg"), "gone.jpg")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    refused(run("--checkpoint", ckpt, "--folder", tmp_path / "empty"), "no images", "empty")
    refused(run("--checkpoint", ckpt, "--folder", tmp_path / "absent"), "absent", "not found")
    bomb_png(tmp_path / "huge.png")
    refused(run("--checkpoint", ckpt, "--image", tmp_path / "huge.png", "--out",
                       tmp_path / "out"), "huge.png", "DecompressionBomb")
    bad = torch.load(ckpt, weights_only=True)
    bad["word_map"]["zebra"] = len(bad["word_map"])
    torch.save(bad, tmp_path / "mixed.pt")
    src = photos(tmp_path / "in", 1)
    refused(run("--checkpoint", tmp_path / "mixed.pt", "--folder", src, "--out",
                       tmp_path / "out"), "vocabular")
    assert not (tmp_path / "out").exists() and not (ckpt.parent / "captions").exists()


def test_a_folder_with_other_files_and_a_broken_image(trained, tmp_path):
    """Files without an image's extension are left out and named; an unreadable image stops the run
    unless --skip-bad-images; without --out the PNGs go beside the checkpoint, not into the folder the
    command runs in."""
    run = tmp_path / "run"
    shutil.copytree(trained("attention").parent, run)
    src = photos(tmp_path / "in", 2)
    (src / "notes.txt").write_text("not an image")
    (src / "broken.jpg").write_bytes(b"not a jpeg either")
    here = set(os.listdir(ROOT))
    refused(run_script("caption.py", "--checkpoint", run / "best.pt", "--folder", src), "broken.jpg",
            "--skip-bad-images")
    assert not (run / "captions").exists()
    r = run_script("caption.py", "--checkpoint", run / "best.pt", "--folder", src, "--skip-bad-images")
    assert r.returncode == 0, r.stderr
    assert "left out 1 file(s)" in r.stdout and "notes.txt" in r.stdout
    assert f"skipped {src / 'broken.jpg'}" in r.stdout
    assert sorted(os.listdir(run / "captions")) == ["photo0.png", "photo1.png"]
    assert set(os.listdir(ROOT)) == here


def test_caption_takes_every_image_mode(trained, tmp_path):
    """CMYK, 16-bit, RGBA, palette and grey photos are not errors: they are converted."""
    from scripts.fixtures import MODES, extension, save_image
    (tmp_path / "in").mkdir()
    for i, mode in enumerate(MODES):
        save_image(tmp_path / "in" / f"{i}_{mode.replace(';', '')}{extension(mode)}", i, mode, 40, 30)
    r = run_script("caption.py", "--checkpoint", trained("rnn"), "--folder", tmp_path / "in", "--out",
                   tmp_path / "out", "--beam-size", 2)
    assert r.returncode == 0, r.stderr
    assert len(os.listdir(tmp_path / "out")) == len(MODES)


def test_the_python_api_imports_from_any_folder(trained, tmp_path):
    """make install installs the project (pip install -e .): a notebook in another folder imports it
    with the project's Python, no sys.path edits."""
    photo, ckpt = str(photos(tmp_path / "in", 1) / "photo0.jpg"), str(trained("rnn"))
    code = f"from captioner import Captioner\nprint(len(Captioner({ckpt!r}, 'cpu').caption([{photo!r}])))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:] + "\n(make install does pip install -e .)"
    assert r.stdout.strip() == "1"
    # beside packages named like its modules (Hugging Face's `datasets`, say), earlier on the path, imported
    # before it or not: it captions, and the user's `import datasets` is still theirs
    for name in ("datasets", "utils", "models", "metrics"):
        (tmp_path / "site" / name).mkdir(parents=True)
        (tmp_path / "site" / name / "__init__.py").write_text("WHO = 'theirs'\n")
    for first in ("", "import datasets, utils\n"):
        check = (f"{first}{code}\nimport datasets, utils, models, metrics\n"
                 "print({m.WHO for m in (datasets, utils, models, metrics)})")
        r = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True,
                           env=dict(env, PYTHONPATH=str(tmp_path / "site")))
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.split() == ["1", "{'theirs'}"], (first, r.stdout)


def test_every_module_is_installed():
    """pyproject.toml's py-modules lists every top-level module, so each imports from any folder."""
    import glob
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        listed = tomllib.load(f)["tool"]["setuptools"]["py-modules"]
    assert sorted(listed) == sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


def test_a_new_users_mistakes_are_one_line_each(trained, tmp_path, monkeypatch, capsys):
    """Every unreadable file at once, an --out that is not a PNG, a beam size of 0, a run folder for
    --checkpoint, a second command into the same folder, and a model that only knows shapes: each said."""
    import caption
    from captioner import Captioner
    from utils import InputError, run_cli

    def run(*argv):
        monkeypatch.setattr(sys, "argv", ["caption.py", *map(str, argv)])
        try:
            run_cli(caption.main)
            code = 0
        except SystemExit as e:
            code = e.code
        return code, *capsys.readouterr()

    ckpt = trained("attention")
    run_folder = tmp_path / "run"
    shutil.copytree(ckpt.parent, run_folder)
    src = photos(tmp_path / "in", 2)
    (src / "a.jpg").write_bytes(b"not a jpeg")
    (src / "b.png").write_bytes(b"not a png")
    code, _, err = run("--checkpoint", ckpt, "--folder", src, "--out", tmp_path / "o")
    assert code == 2 and err.count("\n") == 1 and "2 of 4 images cannot be read" in err
    assert "a.jpg" in err and "b.png" in err and "--skip-bad-images" in err
    code, _, err = run("--checkpoint", ckpt, "--image", src / "photo0.jpg", "--out", tmp_path / "coffee.jpg")
    assert code == 2 and "--out" in err and "coffee.jpg" in err and ".png" in err
    code, _, err = run("--checkpoint", ckpt, "--folder", src, "--beam-size", 0)
    assert (code, err) == (2, "caption.py: error: argument --beam-size: must be at least 1, got 0 "
                              "(--help lists the options)\n")
    assert not (tmp_path / "o").exists() and not (tmp_path / "coffee.jpg").exists()
    for name in ("a.jpg", "b.png"):
        os.remove(src / name)
    code, out, _ = run("--checkpoint", run_folder, "--folder", src)
    assert code == 0 and f"{run_folder} is a run folder: using its best.pt" in out
    assert "trained on the built-in shapes data" in out and "replacing" not in out
    code, out, _ = run("--checkpoint", run_folder / "best.pt", "--folder", src, "--beam-size", 1)
    assert code == 0 and "replacing 2 of an earlier run" in out
    with pytest.raises(InputError, match="beam_size must be at least 1, got 0"):
        Captioner(run_folder / "best.pt").caption([src / "photo0.jpg"], beam_size=0)


def test_options_a_decoder_cannot_take_are_refused_as_typed(trained, tmp_path, monkeypatch, capsys):
    """A caption longer than the Transformer's position table, and --hard-inference for a decoder without
    hard attention, are refused in one line naming the option as the user gave it (caption.py, eval.py,
    its decoding benchmark, bench.py, the Python API) and before any work; the API takes a run folder as
    caption.py does."""
    import bench
    import caption
    import eval as ev
    from captioner import Captioner
    from utils import InputError
    src = photos(tmp_path / "in", 1)
    ckpt = trained("transformer")
    run_folder = tmp_path / "run"
    shutil.copytree(ckpt.parent, run_folder)
    captioner = Captioner(run_folder, "cpu")  # a run folder: its best.pt
    assert capsys.readouterr().out == f"{run_folder} is a run folder: using its best.pt\n"
    with pytest.raises(InputError, match=r"^max_len=64 is more words .* allow 63 words and <end>; give max_len=63"):
        captioner.caption([src / "missing.jpg"], max_len=64)  # refused before any image is read
    for decoder in ("transformer", "rnn"):
        with pytest.raises(InputError, match=r"^hard_inference=argmax chooses how hard attention picks its cell; .* "
                                             f"--decoder {decoder}, which has no cell to pick"):
            Captioner(trained(decoder), "cpu", hard_inference="argmax")
    out = tmp_path / "out"
    for module, argv, said in (
            (caption, ["--image", src / "photo0.jpg", "--out", out, "--max-len", 100], "--max-len 100 is more words"),
            (caption, ["--image", src / "photo0.jpg", "--out", out, "--hard-inference", "argmax"],
             "--hard-inference argmax chooses"),
            (ev, ["--beam-size", 3, "--benchmark-decoding", 2, "--max-len", 100], "--max-len 100 is more words"),
            (ev, ["--beam-size", 1, "--max-len", 100, "--out", out / "e.json"], "--max-len 100 is more words"),
            (ev, ["--hard-inference", "expected"], "--hard-inference expected chooses")):
        code, err = run_main(module, ["--checkpoint", ckpt, *argv], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and said in err, (module.__name__, argv, err)
    from scripts import transformer_maps
    code, err = run_main(transformer_maps, ["--checkpoint", trained("attention")], monkeypatch, capsys)
    assert code == 2 and "was trained with --decoder attention: this script is for --decoder transformer" in err, err
    code, err = run_main(bench, ["--tiny", "--decoder", "rnn", "transformer", "--decode-len", 70], monkeypatch, capsys)
    assert code == 2 and "--decode-len 70 is more words" in err and "give --decode-len 63 or less" in err, err
    assert not out.exists()
