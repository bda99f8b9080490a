"""create_input_files.py end to end on Karpathy-format data the tests write (and the built-in shapes),
image loading, and every bad input: each refusal is exit status 2 and one `error:` line naming the
culprit, with no traceback, no partial output, and files already there untouched."""
import errno
import json
import os
import sys

import h5py
import numpy as np
import pytest
from PIL import Image

import create_input_files
from datasets import SPECIAL_TOKENS, CaptionDataset, Vocabulary, base_name, data_path, load_image
from scripts.fixtures import colour_of, make_karpathy
from tests.helpers import SIZE, bomb_png, files, prepare, prepare_coco, refused, run_script
from utils import run_cli

@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    src = tmp_path_factory.mktemp("coco")
    _, entries = make_karpathy(src, num_images=16, dataset="coco")
    out = src / "out"
    r = prepare_coco(src, out, "--workers", 2)
    assert r.returncode == 0, r.stderr
    return src, out, entries, r.stdout


NAME = base_name("coco", 5, 0)


def read(out, kind, split=None):
    with open(data_path(out, kind, NAME, split)) as f:
        return json.load(f)


def test_file_set_and_layout(coco):
    _, out, entries, stdout = coco
    expected = {os.path.basename(data_path(out, k, NAME, s))
                for s in ("TRAIN", "VAL", "TEST") for k in ("IMAGES", "CAPTIONS", "CAPLENS", "REFS")}
    expected.add(os.path.basename(data_path(out, "WORDMAP", NAME)))
    assert set(os.listdir(out)) == expected
    word_map = read(out, "WORDMAP")
    assert word_map["<pad>"] == 0 and all(t in word_map for t in SPECIAL_TOKENS)
    assert sorted(word_map.values()) == list(range(len(word_map)))
    assert "long" not in word_map  # only in captions over max_len
    # restval goes to TRAIN: splits cycle train, val, test, restval over 16 images
    counts = {"TRAIN": 8, "VAL": 4, "TEST": 4}
    for split, n in counts.items():
        with h5py.File(data_path(out, "IMAGES", NAME, split), "r") as h:
            images = h["images"]
            assert images.shape == (n, 3, SIZE, SIZE) and images.dtype == np.uint8
            assert h.attrs["captions_per_image"] == 5
            assert images.chunks == (1, 3, SIZE, SIZE)
        caps, lens = read(out, "CAPTIONS", split), read(out, "CAPLENS", split)
        assert len(caps) == len(lens) == 5 * n
        assert all(len(c) == 52 for c in caps)  # max_len 50 + <start> + <end>
        for c, n_tok in zip(caps, lens, strict=True):
            assert c[0] == word_map["<start>"] and c[n_tok - 1] == word_map["<end>"]
            assert all(t == 0 for t in c[n_tok:]) and 0 not in c[:n_tok]
    assert "TRAIN" in stdout and "vocabulary" in stdout and "images/s" in stdout


def test_references_file_keeps_every_raw_caption_with_the_dataset_ids(coco):
    """REFS: per image in HDF5 order, the COCO id, the file, and every caption, none dropped: image 1
    has 7 captions, and each image's 60-word caption (dropped from the encoded captions) is there."""
    src, out, entries, _ = coco
    for split in ("TRAIN", "VAL", "TEST"):
        refs = read(out, "REFS", split)
        expected = split_entries(entries, split)
        assert [r["image_id"] for r in refs] == [e["cocoid"] for e in expected]
        for r, e in zip(refs, expected, strict=True):
            assert r["file"] == str(src / "images" / e["filepath"] / e["filename"])
            assert r["references"] == [" ".join(t["tokens"]).lower() for t in e["sentences"]]
    counts = sorted(len(r["references"]) for split in ("TRAIN", "VAL", "TEST") for r in read(out, "REFS", split))
    assert counts[0] == 3 and counts[-1] == 8  # 2 + the long one, 7 + the long one


def split_entries(entries, split):
    wanted = {"TRAIN": ("train", "restval"), "VAL": ("val",), "TEST": ("test",)}[split]
    return [e for e in entries if e["split"] in wanted]


def test_captions_round_trip_and_sampling(coco):
    _, out, entries, _ = coco
    vocab = Vocabulary(read(out, "WORDMAP"))
    for split in ("TRAIN", "VAL", "TEST"):
        caps = read(out, "CAPTIONS", split)
        for k, entry in enumerate(split_entries(entries, split)):
            originals = [s["tokens"] for s in entry["sentences"] if len(s["tokens"]) <= 50]
            got = [vocab.decode(c) for c in caps[5 * k:5 * k + 5]]
            assert all(g in originals for g in got)
            if len(originals) >= 5:  # without replacement: five different captions
                assert len({tuple(g) for g in got}) == 5
            else:  # image 0 has 2: both appear, the rest are repeats
                assert {tuple(g) for g in got} == {tuple(o) for o in originals}


def test_images_in_order_and_every_mode_converted(coco):
    src, out, entries, _ = coco
    for split in ("TRAIN", "VAL", "TEST"):
        with h5py.File(data_path(out, "IMAGES", NAME, split), "r") as h:
            images = h["images"][:]
        for k, entry in enumerate(split_entries(entries, split)):
            i, img = entry["imgid"], images[k].astype(int)
            mode = ("RGB", "L", "RGBA", "CMYK", "I;16", "P", "LA", "EXIF")[i % 8]
            mean = img.reshape(3, -1).mean(1)
            if mode in ("RGB", "CMYK", "P"):  # the nearest reference colour is this image's
                dist = [np.abs(mean - colour_of(j)).sum() for j in range(len(entries))]
                assert int(np.argmin(dist)) == i, (mode, mean, colour_of(i))
            elif mode in ("L", "LA"):
                assert (img[0] == img[1]).all() and (img[1] == img[2]).all()
            elif mode == "RGBA":  # transparent left half on white
                assert (img[:, :, : SIZE // 3] >= 250).all()
            elif mode == "I;16":  # 16-bit ramp scaled to 0..255, not clipped at 255
                row = img[0, SIZE // 2]
                assert row[0] < 15 and row[-1] > 240 and (np.diff(row) >= 0).all()
            elif mode == "EXIF":  # orientation applied: red on top, blue at the bottom
                top, bottom = img[:, : SIZE // 3].mean((1, 2)), img[:, -SIZE // 3:].mean((1, 2))
                assert top[0] > 200 and top[2] < 50 and bottom[2] > 200 and bottom[0] < 50


def test_byte_identical_across_runs_and_worker_counts(coco, tmp_path):
    src, out, _, _ = coco
    r = prepare_coco(src, tmp_path, "--workers", 1)
    assert r.returncode == 0, r.stderr
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes(), name


@pytest.mark.slow
def test_flickr_format(tmp_path):
    make_karpathy(tmp_path, num_images=8, dataset="flickr8k")
    r = prepare("--dataset", "flickr8k", "--karpathy-json", tmp_path / "dataset_flickr8k.json",
                "--image-folder", tmp_path / "images", "--output-folder", tmp_path / "out",
                "--image_size", SIZE, "--captions-per-image", 3, "--workers", 1)
    assert r.returncode == 0, r.stderr
    name = base_name("flickr8k", 3, 5)
    with h5py.File(data_path(tmp_path / "out", "IMAGES", name, "TRAIN"), "r") as h:
        assert h["images"].shape == (4, 3, SIZE, SIZE) and h.attrs["captions_per_image"] == 3


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "CMYK", "I;16", "P", "LA", "EXIF"])
def test_load_image_every_mode(tmp_path, mode):
    from scripts.fixtures import extension, save_image
    path = tmp_path / f"x{extension(mode)}"
    save_image(path, 3, mode, 50, 30)
    a = load_image(path, 16)
    assert a.shape == (3, 16, 16) and a.dtype == np.uint8


def test_shapes_from_the_command_line(tmp_path):
    r = run_script("create_input_files.py", "--dataset", "shapes", "--output-folder", tmp_path, "--num-images", 40,
                   "--min-word-freq", 0)
    assert r.returncode == 0, r.stderr
    name = base_name("shapes", 5, 0)
    for split, n in (("TRAIN", 32), ("VAL", 4), ("TEST", 4)):
        ds = CaptionDataset(tmp_path, name, split)
        assert ds.num_images == n and ds[0].image.shape == (3, 64, 64)
        with open(data_path(tmp_path, "BOXES", name, split)) as f:
            boxes = json.load(f)
        assert len(boxes) == n and all(1 <= len(b) <= 3 for b in boxes)
    samples = sorted(os.listdir(tmp_path / "samples"))
    assert samples == [f"test_{k:02d}.png" for k in range(4)]  # TEST has 4 images here
    first = np.asarray(Image.open(tmp_path / "samples" / samples[0])).transpose(2, 0, 1)
    assert np.array_equal(first, CaptionDataset(tmp_path, name, "TEST")[0][0].numpy())


# ----------------------------------------------------------------------------- bad inputs


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
