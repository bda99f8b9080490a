"""create_input_files.py --dataset custom: CSV and JSON Lines captions for your own images, the
tokenising rule, the split assignment, the same guarantees as the Karpathy path, and every refusal."""
import json

import numpy as np
import pytest
from PIL import Image

from create_input_files import tokenize
from datasets import base_name, data_path
from tests.helpers import prepare


NAME = base_name("mine", 5, 0)


def photos(folder, n):
    """n small distinct JPEGs, in a sub-folder for every third one (names below the folder are ids)."""
    names = []
    for i in range(n):
        name = f"sub/p{i:02d}.jpg" if i % 3 == 0 else f"p{i:02d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((20, 30, 3), (i * 9 % 256, 80, 200 - i), np.uint8)).save(folder / name)
        names.append(name)
    return names


def custom(src, captions, *extra, out=None):
    return prepare("--dataset", "custom", "--captions", captions, "--image-folder", src / "images",
                   "--output-folder", out or src / "out", "--name", "mine", "--min-word-freq", 0,
                   "--image-size", 16, "--workers", 1, *extra)


def read(out, kind, split=None):
    with open(data_path(out, kind, NAME, split)) as f:
        return json.load(f)


def test_tokenize_is_karpathys_rule():
    assert tokenize("A Man's T-shirt, red!  Two dogs.") == ["a", "mans", "tshirt", "red", "two", "dogs"]
    assert tokenize(" ... ") == []


@pytest.fixture
def src(tmp_path):
    names = photos(tmp_path / "images", 20)
    return tmp_path, names


def test_csv_with_assigned_splits_per_image(src):
    src, names = src
    rows = ["image,caption"] + [f"{n},A photo number {i}." for i, n in enumerate(names)]
    rows += [f"{names[0]},\"Another, quoted caption\""]
    (src / "c.csv").write_text("\n".join(rows) + "\n")
    r = custom(src, src / "c.csv")
    assert r.returncode == 0, r.stderr
    refs = {s: read(src / "out", "REFS", s) for s in ("TRAIN", "VAL", "TEST")}
    assert [len(refs[s]) for s in ("TRAIN", "VAL", "TEST")] == [16, 2, 2]  # 80/10/10 of 20 images
    ids = [r["image_id"] for s in refs for r in refs[s]]
    assert sorted(ids) == sorted(names)  # each image once: its captions never in two splits
    first = next(r for s in refs for r in refs[s] if r["image_id"] == names[0])
    assert first["references"] == ["a photo number 0", "another quoted caption"]
    assert first["file"] == str(src / "images" / names[0])
    again = custom(src, src / "c.csv", "--overwrite", "--workers", 2, out=src / "again")
    assert again.returncode == 0, again.stderr
    for path in (src / "out").iterdir():  # same seed, same files, whatever the worker count
        assert path.read_bytes() == (src / "again" / path.name).read_bytes(), path.name
    other = custom(src, src / "c.csv", "--seed", 7, out=src / "seed7")
    assert other.returncode == 0 and read(src / "seed7", "REFS", "VAL") != refs["VAL"]


def test_json_lines_with_given_splits_and_a_caption_list(src):
    src, names = src
    lines = [{"image": n, "captions": [f"picture {i}", f"image {i} again"], "split": ["train", "val", "test"][i % 3]}
             for i, n in enumerate(names)]
    lines[4] = {"image": names[4], "caption": "one caption only"}  # no split: assigned
    (src / "c.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    r = custom(src, src / "c.jsonl")
    assert r.returncode == 0, r.stderr
    test_ids = [x["image_id"] for x in read(src / "out", "REFS", "TEST")]
    assert set(names[2::3]) <= set(test_ids)
    assert len(read(src / "out", "CAPTIONS", "TEST")) == 5 * len(test_ids)  # 2 captions sampled up to 5


@pytest.mark.parametrize("content,suffix,needles", [
    ("picture,text\na.jpg,hello\n", ".csv", ("'image' column",)),
    ("image,caption\np01.jpg,\n", ".csv", ("c.csv:2", "empty caption", "p01.jpg")),
    ("image,caption,split\np01.jpg,a cat,holdout\n", ".csv", ("c.csv:2", "unknown split", "holdout")),
    ("image,caption,split\np01.jpg,a cat,train\np01.jpg,a dog,test\n", ".csv", ("c.csv:3", "one image, one split")),
    ("image,caption,split\nnope.jpg,a cat,train\np01.jpg,a dog,val\np02.jpg,a bird,test\n", ".csv",
     ("nope.jpg", "not found")),
    ('{"image": "p01.jpg", "caption": "a cat"}\n{"image": "p02.jpg", caption: 1}\n', ".jsonl",
     ("c.jsonl:2", "not JSON")),
    ('{"image": "p01.jpg"}\n', ".jsonl", ("c.jsonl:1", "captions")),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe binary", ".csv", ("c.csv", "not a CSV")),
    ("image,caption\np01.jpg,a cat\np02.jpg,a dog\n", ".csv", ("split VAL has no images",)),
    ("\n", ".csv", ("c.csv is empty", "header line")),
])
def test_refusals_name_the_culprit(src, content, suffix, needles):
    src, _ = src
    path = src / f"c{suffix}"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    r = custom(src, path)
    assert r.returncode == 2, (r.stdout, r.stderr)
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    for needle in needles:
        assert needle in line, (needle, line)
    assert "Traceback" not in r.stderr and not (src / "out").exists()


def test_bad_image_skipped_when_asked(src):
    src, names = src
    (src / "images" / names[5]).write_bytes(b"not a jpeg")
    (src / "c.csv").write_text("image,caption\n" + "".join(f"{n},photo {i}\n" for i, n in enumerate(names)))
    r = custom(src, src / "c.csv")
    assert r.returncode == 2 and names[5] in r.stderr
    assert not (src / "out").exists() or not any((src / "out").iterdir())  # nothing half-written
    r = custom(src, src / "c.csv", "--skip-bad-images")
    assert r.returncode == 0, r.stderr
    ids = [x["image_id"] for s in ("TRAIN", "VAL", "TEST") for x in read(src / "out", "REFS", s)]
    assert names[5] not in ids and len(ids) == 19
