"""CaptionDataset over files in the tutorial's layout."""
import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from datasets import CaptionDataset, base_name, data_path, load_word_map
from utils import InputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tutorial_layout(folder, name, n_images=6, cpi=5, max_len=10, seed=0):
    """Exactly what sgrvinod's create_input_files writes: lists of ints in JSON, an HDF5 file with an
    `images` dataset and a `captions_per_image` attribute."""
    rng = np.random.default_rng(seed)
    word_map = {w: i + 1 for i, w in enumerate("a b c d e".split())}
    word_map.update({"<unk>": 6, "<start>": 7, "<end>": 8, "<pad>": 0})
    with open(os.path.join(folder, f"WORDMAP_{name}.json"), "w") as j:
        json.dump(word_map, j)
    for split in ("TRAIN", "VAL", "TEST"):
        with h5py.File(os.path.join(folder, f"{split}_IMAGES_{name}.hdf5"), "a") as h:
            h.attrs["captions_per_image"] = cpi
            images = h.create_dataset("images", (n_images, 3, 8, 8), dtype="uint8")
            images[:] = rng.integers(0, 256, size=(n_images, 3, 8, 8))
        caps, lens = [], []
        for _ in range(n_images * cpi):
            n = int(rng.integers(1, max_len + 1))
            body = [int(t) for t in rng.integers(1, 6, size=n)]
            caps.append([7] + body + [8] + [0] * (max_len - n))
            lens.append(n + 2)
        with open(os.path.join(folder, f"{split}_CAPTIONS_{name}.json"), "w") as j:
            json.dump(caps, j)
        with open(os.path.join(folder, f"{split}_CAPLENS_{name}.json"), "w") as j:
            json.dump(lens, j)


@pytest.fixture(scope="module")
def tutorial(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tutorial")
    name = base_name("coco", 5, 5)
    write_tutorial_layout(folder, name)
    return folder, name


def test_tutorial_layout_loads(tutorial):
    folder, name = tutorial
    assert load_word_map(folder, name)["<pad>"] == 0
    train = CaptionDataset(folder, name, "TRAIN")
    assert len(train) == 30  # one item per (image, caption)
    item = train[7]
    assert type(item).__name__ == "TrainItem"
    image, caption, caplen = item.image, item.caption, item.length
    with h5py.File(data_path(folder, "IMAGES", name, "TRAIN"), "r") as h:
        assert torch.equal(image, torch.from_numpy(h["images"][1]))
    with open(data_path(folder, "CAPTIONS", name, "TRAIN")) as f:
        assert caption.tolist() == json.load(f)[7]
    assert image.dtype == torch.uint8 and caption.dtype == torch.long and caplen.shape == ()

    test = CaptionDataset(folder, name, "TEST")
    assert len(test) == 6  # one item per image
    item = test[4]
    assert type(item).__name__ == "EvalItem" and item.index == 4 and item.captions.shape == (5, 12)
    with open(data_path(folder, "CAPTIONS", name, "TEST")) as f:
        assert item.captions.tolist() == json.load(f)[20:25]
    batch = next(iter(DataLoader(test, batch_size=4)))  # batched field by field, names kept
    assert batch.image.shape == (4, 3, 8, 8) and batch.captions.shape == (4, 5, 12)
    assert batch.index.tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("split", ["TRAIN", "TEST"])
def test_loader_same_samples_with_0_and_2_workers(tutorial, split):
    folder, name = tutorial
    ds = CaptionDataset(folder, name, split)
    ds[0]  # a handle opened in this process must not leak into the workers
    batches = []
    for workers in (0, 2):
        loader = DataLoader(ds, batch_size=4, num_workers=workers, shuffle=False)
        batches.append([b for b in loader])
    assert len(batches[0]) == len(batches[1])
    for b0, b1 in zip(*batches, strict=True):
        for t0, t1 in zip(b0, b1, strict=True):
            assert torch.equal(t0, t1)


def test_missing_split_and_bad_word_map(tutorial, tmp_path):
    folder, name = tutorial
    with pytest.raises(InputError, match="not prepared"):
        CaptionDataset(tmp_path, name, "TRAIN")
    with pytest.raises(InputError, match="unknown split"):
        CaptionDataset(folder, name, "train")
    (tmp_path / f"WORDMAP_{name}.json").write_text('{"a": 1, "<pad>": 0}')
    with pytest.raises(InputError, match="<unk>"):
        load_word_map(tmp_path, name)


def cache_config(folder, name, encoded_size=4):
    return {"encoder": "resnet18", "encoder_stages": 1, "encoded_size": encoded_size, "coord_channels": True,
            "data_folder": str(folder), "data_name": name, "batch_size": 4}


def test_feature_cache_keeps_the_trunk_grid_and_reads_as_the_encoder_output(tutorial):
    """The cache holds the trunk's 2 x 2 grid of these 8 px images, not the 4 x 4 cells of
    encoded_size; pooled on the way out, it gives the encoder's features to float16 rounding."""
    from contextlib import nullcontext

    from datasets import feature_cache
    from encoder import Encoder, features_of
    folder, name = tutorial
    encoder = Encoder("resnet18", "none", encoded_size=4, stages=1, coords=True)
    train = CaptionDataset(folder, name, "TRAIN")
    path = feature_cache(train, encoder, cache_config(folder, name), torch.device("cpu"), nullcontext())
    assert np.load(path, mmap_mode="r").shape == (6, 64, 2, 2)
    images = torch.stack([train[5 * i].image for i in range(6)])
    train.use_features(path)
    cached = next(iter(DataLoader(train, batch_size=30))).image[::5]  # each image's first caption
    assert cached.dtype == torch.float16 and cached.shape == (6, 64, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(features_of(encoder, cached), encoder(images), atol=2e-3, rtol=1e-3)
    item = train[(5, 7, 9)]  # group_by_image: one read of image 1 for three of its captions
    assert item.caption.shape == (3, 12) and item.length.shape == (3,) and int(item.index) == 1
    assert torch.equal(item.image, train[5].image)


def test_a_cache_of_another_layout_is_not_misread(tutorial):
    """A cache written before the grid layout (N x P x D, named without it) is another file; a file of
    the wrong shape under the new name is written again."""
    import hashlib
    from contextlib import nullcontext

    from datasets import feature_cache
    from encoder import Encoder
    folder, name = tutorial
    cfg = cache_config(folder, name, encoded_size=3)
    encoder = Encoder("resnet18", "none", encoded_size=3, stages=1, coords=True)
    val = CaptionDataset(folder, name, "VAL")
    stat = os.stat(val.h5_path)  # how the cache was named before (no layout in the key)
    old = hashlib.sha1(repr([cfg[k] for k in ("encoder", "encoder_stages", "encoded_size", "coord_channels")]
                            + [val.h5_path, stat.st_size, stat.st_mtime_ns]).encode())
    for key, value in encoder.state_dict().items():
        old.update(key.encode() + value.cpu().numpy().tobytes())
    old_path = os.path.join(folder, "cache", f"VAL_{name}_{old.hexdigest()[:12]}.npy")
    os.makedirs(os.path.dirname(old_path), exist_ok=True)
    np.save(old_path, np.zeros((6, 9, 66), np.float16))
    path = feature_cache(val, encoder, cfg, torch.device("cpu"), nullcontext())
    assert path != old_path and np.load(path).shape == (6, 64, 2, 2)
    np.save(path, np.zeros((6, 9, 66), np.float16))
    assert feature_cache(val, encoder, cfg, torch.device("cpu"), nullcontext()) == path
    assert np.load(path).shape == (6, 64, 2, 2)  # rewritten, not read as it was


def test_the_disk_space_check_counts_the_grid(tutorial, monkeypatch, tmp_path):
    """6 grids of 64 x 2 x 2 float16 need 3 KiB; the 4 x 4 cells with coordinates would need 12."""
    from collections import namedtuple
    from contextlib import nullcontext

    import datasets
    from encoder import Encoder
    folder, name = tutorial
    test = CaptionDataset(folder, name, "TEST")
    cfg = dict(cache_config(folder, name), data_folder=str(tmp_path))
    encoder = Encoder("resnet18", "none", encoded_size=4, stages=1, coords=True)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(datasets.shutil, "disk_usage", lambda _: usage(0, 0, 3300))
    with pytest.raises(InputError, match="needs 0.0 GiB"):
        datasets.feature_cache(test, encoder, cfg, torch.device("cpu"), nullcontext())
    monkeypatch.setattr(datasets.shutil, "disk_usage", lambda _: usage(0, 0, 5000))
    assert os.path.getsize(datasets.feature_cache(test, encoder, cfg, torch.device("cpu"), nullcontext())) < 5000
