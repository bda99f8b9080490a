"""Prepared-data file layout, image loading, and CaptionDataset over the prepared files.

The layout is sgrvinod/a-PyTorch-Tutorial-to-Image-Captioning's, so data prepared there loads here:
{SPLIT}_IMAGES_{name}.hdf5 (dataset `images`, uint8 N x 3 x H x W, attribute `captions_per_image`),
{SPLIT}_CAPTIONS_{name}.json (encoded, padded to max_len + 2), {SPLIT}_CAPLENS_{name}.json and
WORDMAP_{name}.json. This repository adds {SPLIT}_REFS_{name}.json (per image, in HDF5 order: the
dataset's image id, the image file, and every reference caption as lower-case space-joined tokens,
none dropped, truncated or <unk>-ed), and the shapes dataset {SPLIT}_BOXES_{name}.json.
"""
import hashlib
import json
import math
import os
import shutil
from typing import NamedTuple

import h5py
import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

from utils import InputError, atomic_path

SPLITS = ("TRAIN", "VAL", "TEST")
SPECIAL_TOKENS = ("<pad>", "<unk>", "<start>", "<end>")


def base_name(dataset, captions_per_image, min_word_freq):
    return f"{dataset}_{captions_per_image}_cap_per_img_{min_word_freq}_min_word_freq"


def data_path(data_folder, kind, data_name, split=None):
    """kind: IMAGES, CAPTIONS, CAPLENS, REFS, BOXES (per split) or WORDMAP."""
    if kind == "WORDMAP":
        return os.path.join(data_folder, f"WORDMAP_{data_name}.json")
    ext = "hdf5" if kind == "IMAGES" else "json"
    return os.path.join(data_folder, f"{split}_{kind}_{data_name}.{ext}")


def _read_json(path):
    if not os.path.isfile(path):
        raise InputError(f"{path} not found: prepare the data with create_input_files.py "
                         "(or check --data_folder and --data_name)")
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}); prepare the data again") from None


def load_boxes(data_folder, data_name, split):
    """Each image's objects and boxes ({SPLIT}_BOXES_{name}.json), or None for data without them
    (everything but shapes)."""
    path = data_path(data_folder, "BOXES", data_name, split)
    return _read_json(path) if os.path.exists(path) else None


def load_references(data_folder, data_name, split, num_images):
    """The split's REFS file as a list of {"image_id", "file", "references"}, or None for data prepared
    elsewhere (the tutorial writes no such file)."""
    path = data_path(data_folder, "REFS", data_name, split)
    if not os.path.exists(path):
        return None
    refs = _read_json(path)
    if not isinstance(refs, list) or len(refs) != num_images or not all(
            isinstance(r, dict) and isinstance(r.get("references"), list) for r in refs):
        raise InputError(f"{path} does not match the {num_images} images of {split}: prepare the data again")
    return refs


def load_vocabulary(data_folder, data_name):
    return Vocabulary(load_word_map(data_folder, data_name))


def load_word_map(data_folder, data_name):
    path = data_path(data_folder, "WORDMAP", data_name)
    word_map = _read_json(path)
    if not isinstance(word_map, dict):
        raise InputError(f"{path} is not a word map: expected a JSON object of word -> id")
    missing = [t for t in SPECIAL_TOKENS if t not in word_map]
    if missing or word_map["<pad>"] != 0:
        raise InputError(f"{path} is not a word map: it needs {', '.join(SPECIAL_TOKENS)} with "
                         f"<pad> = 0 (missing: {', '.join(missing) or 'none'})")
    return word_map


class Vocabulary:
    """The word map both ways. Ids of the special tokens: pad (always 0), unk, start, end."""

    def __init__(self, word_map):
        self.word_map = word_map
        self.words = {i: w for w, i in word_map.items()}
        self.pad, self.unk, self.start, self.end = (word_map[t] for t in SPECIAL_TOKENS)
        self._silent = {self.pad, self.start, self.end}

    def __len__(self):
        return len(self.word_map)

    def __eq__(self, other):
        return isinstance(other, Vocabulary) and self.word_map == other.word_map

    def encode(self, tokens, max_len):
        """Words -> <start> ids <end>, padded to max_len + 2; unknown words become <unk>."""
        ids = [self.start] + [self.word_map.get(w, self.unk) for w in tokens] + [self.end]
        return ids + [self.pad] * (max_len + 2 - len(ids))

    def decode(self, ids):
        """Token ids -> words, without <start>, <end> and <pad>."""
        return [self.words[i] for i in ids if i not in self._silent]


def to_rgb(im):
    """Any Pillow mode -> RGB. 16-bit greys are scaled rather than clipped; transparent pixels are
    put on white, which is how viewers show them (a plain convert would make them black)."""
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        a = np.asarray(im, dtype=np.float64)
        a = a / 257.0 if im.mode != "F" else a  # 0..65535 -> 0..255
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    if "A" in im.mode or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return im.convert("RGB")


def load_image(path, size):
    """Read any image Pillow opens as 3 x size x size uint8 RGB, EXIF orientation applied.
    Data preparation and captioning both use this, so a user's photo is seen as training images were."""
    with Image.open(path) as im:
        im.load()  # decode now, so a truncated file fails here
        return image_array(im, size)


def image_array(im, size):
    """A Pillow image -> 3 x size x size uint8 RGB, EXIF orientation applied, resized bicubic."""
    im = to_rgb(ImageOps.exif_transpose(im))
    im = im.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


class TrainItem(NamedTuple):
    """One (image, caption) pair of TRAIN. The DataLoader batches it field by field."""
    image: torch.Tensor  # uint8 3 x H x W, or a float16 C x g x g grid from the feature cache
    caption: torch.Tensor  # max_len + 2 token ids: <start> ... <end> <pad> ...
    length: torch.Tensor  # tokens in caption, <start> and <end> included
    index: torch.Tensor  # the image's index in the split (self-critical training looks up its references)


class EvalItem(NamedTuple):
    """One image of VAL or TEST with everything evaluation uses."""
    image: torch.Tensor  # uint8 3 x H x W, or a float16 C x g x g grid from the feature cache
    captions: torch.Tensor  # captions_per_image x (max_len + 2): all its encoded captions
    index: torch.Tensor  # its index in the split


class CaptionDataset(Dataset):
    """One prepared split.

    TRAIN yields a TrainItem per (image, caption) pair; VAL and TEST an EvalItem per image, so an
    epoch of evaluation visits each image once. Images are uint8 3 x H x W: normalise per batch on the
    device, which is several times faster than per sample in the workers. After use_features(path) (a
    .npy file of N x C x g x g float16, see feature_cache) items carry the encoder's grids, not images.
    """

    def __init__(self, data_folder, data_name, split):
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
        self.split = split
        self.h5_path = data_path(data_folder, "IMAGES", data_name, split)
        if not os.path.isfile(self.h5_path):
            raise InputError(f"{self.h5_path} not found: split {split} of {data_name} is not prepared "
                             f"in {data_folder} (run create_input_files.py, or check --data_folder)")
        try:
            with h5py.File(self.h5_path, "r") as h:
                self.num_images, _, _, self.image_size = h["images"].shape
                self.cpi = int(h.attrs["captions_per_image"])
        except (OSError, KeyError) as e:
            raise InputError(f"{self.h5_path} is not a prepared image file ({e})") from None
        captions = _read_json(data_path(data_folder, "CAPTIONS", data_name, split))
        caplens = _read_json(data_path(data_folder, "CAPLENS", data_name, split))
        if not (len(captions) == len(caplens) == self.num_images * self.cpi):
            raise InputError(f"{data_name} {split}: {len(captions)} captions and {len(caplens)} lengths "
                             f"for {self.num_images} images x {self.cpi}; prepare the data again")
        # One tensor rather than lists of lists: forked workers then share it without copying.
        self.captions = torch.tensor(captions, dtype=torch.int32)
        self.caplens = torch.tensor(caplens, dtype=torch.int32)
        self._h5, self._pid, self.features = None, None, None

    def use_features(self, path):
        """From now on yield the cached encoder features in `path` (.npy) instead of the images."""
        self.features, self._pid = path, None

    def __len__(self):
        return len(self.captions) if self.split == "TRAIN" else self.num_images

    def _images(self):
        # h5py handles (and memory maps) cannot cross a fork or a pickle: each process opens its own.
        if self._pid != os.getpid():
            self._h5, self._pid = h5py.File(self.h5_path, "r"), os.getpid()
            self._feats = np.load(self.features, mmap_mode="r") if self.features else None
        return self._feats if self.features else self._h5["images"]

    def __getstate__(self):
        return {**self.__dict__, "_h5": None, "_pid": None, "_feats": None}

    def __getitem__(self, i):
        """TRAIN: caption i, or a tuple of caption indices of one image (distributed.EpochSampler with
        group_by_image), whose image is read once: then caption is k x (max_len + 2), length k."""
        first = i[0] if isinstance(i, tuple) else i
        img_idx = first // self.cpi if self.split == "TRAIN" else i
        image = self._images()[img_idx]
        image = torch.from_numpy(np.array(image) if self.features else image)  # memmaps are read-only
        if self.split == "TRAIN":
            rows = torch.tensor(i) if isinstance(i, tuple) else i
            return TrainItem(image, self.captions[rows].long(), self.caplens[rows].long(), torch.tensor(img_idx))
        return EvalItem(image, self.image_captions(img_idx), torch.tensor(img_idx))

    def image_captions(self, img_idx):
        """All captions of one image: captions_per_image x (max_len + 2)."""
        return self.captions[img_idx * self.cpi:(img_idx + 1) * self.cpi].long()


CACHE_LAYOUT = "grid"  # what a cache file holds (Encoder.cache_grid); part of its name, so no other layout is misread


@torch.no_grad()
def feature_cache(dataset, encoder, cfg, device, amp):
    """Encode every image of a split once with the frozen encoder, into a float16 .npy file under
    {data_folder}/cache/ named by a hash of the encoder's weights and settings: later epochs, and
    later runs with the same encoder, read it instead of running the encoder again. It keeps the
    trunk's own grid (N x C x g x g, Encoder.cache_grid), which the training step pools to the decoders'
    cells on the device: ResNet-101 at 256 px caches 8 x 8 cells per image, not 14 x 14. Returns the
    file's path."""
    encoder.eval()
    images_file = os.stat(dataset.h5_path)  # prepared again means cached again
    key = hashlib.sha1(repr([cfg[k] for k in ("encoder", "encoder_stages", "encoded_size", "coord_channels")]
                            + [CACHE_LAYOUT, dataset.h5_path, images_file.st_size, images_file.st_mtime_ns]).encode())
    for name, value in encoder.state_dict().items():
        key.update(name.encode() + value.cpu().numpy().tobytes())
    path = os.path.join(cfg["data_folder"], "cache", f"{dataset.split}_{cfg['data_name']}_{key.hexdigest()[:12]}.npy")
    images, n, size = dataset._images(), dataset.num_images, cfg["batch_size"]
    shape = (n,) + tuple(encoder.cache_grid(torch.from_numpy(images[:1]).to(device)).shape[1:])  # N x C x g x g
    if os.path.exists(path) and np.load(path, mmap_mode="r").shape == shape:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    need, free = 2 * math.prod(shape), shutil.disk_usage(os.path.dirname(path)).free
    if need > 0.9 * free:
        raise InputError(f"caching {dataset.split} features needs {need / 2**30:.1f} GiB in {os.path.dirname(path)}, "
                         f"{free / 2**30:.1f} GiB are free: free some, or set cache_features: false")
    with atomic_path(path) as tmp:
        cache = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
        for s in tqdm(range(0, n, size), desc=f"cache {dataset.split} features", unit="batch", leave=False):
            with amp:
                grid = encoder.cache_grid(torch.from_numpy(images[s:s + size]).to(device))  # b x C x g x g
            cache[s:s + size] = grid.float().cpu().numpy()
        cache.flush()
        del cache
    print(f"cached {dataset.split} encoder features: {path} ({os.path.getsize(path) / 2**20:.0f} MiB)")
    return path
