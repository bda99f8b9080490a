"""Builds a small Karpathy-format dataset on disk: real image files of many Pillow modes, a
dataset_*.json beside them. Used by the tests, and on its own to time data preparation:

    python scripts/fixtures.py --out /tmp/kp --num-images 2000 --width 640 --height 480
    python create_input_files.py --dataset coco --karpathy-json /tmp/kp/dataset_coco.json \
        --image-folder /tmp/kp/images --output-folder /tmp/kp/out --workers 1

With --dataset flickr8k --csv it also writes /tmp/kp/captions.csv (image,caption; five captions per
image) for `create_input_files.py --dataset custom --captions /tmp/kp/captions.csv --image-folder
/tmp/kp/images`.
"""
import argparse
import json
import os

import numpy as np
from PIL import Image

WORDS = "a man dog cat sits runs on the grass with red ball near tree".split()
MODES = ("RGB", "L", "RGBA", "CMYK", "I;16", "P", "LA", "EXIF")  # cycled over the images


def colour_of(index):
    """A distinct, saturated RGB colour per image index, so tests can tell images apart."""
    rng = np.random.default_rng(index)
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def save_image(path, index, mode, width, height):
    """Write image `index` in `mode`: colour_of(index) with a smooth texture of mean zero (so JPEG
    sizes and decode times are photo-like), except EXIF, which is red over blue once its orientation
    tag is applied."""
    rng = np.random.default_rng(index)
    texture = Image.fromarray(rng.integers(0, 81, size=(6, 8, 3), dtype=np.uint8))
    texture = np.asarray(texture.resize((width, height), Image.Resampling.BICUBIC), np.float32) - 40
    rgb = Image.fromarray(np.clip(np.add(colour_of(index), texture), 0, 255).astype(np.uint8))
    if mode == "RGB":
        rgb.save(path, quality=95)
    elif mode == "L":
        rgb.convert("L").save(path)
    elif mode == "RGBA":
        im = rgb.convert("RGBA")
        im.putalpha(Image.new("L", im.size, 255))
        im.paste((0, 0, 0, 0), (0, 0, width // 2, height))  # left half fully transparent
        im.save(path)
    elif mode == "CMYK":
        rgb.convert("CMYK").save(path, quality=95)
    elif mode == "I;16":  # 16-bit greyscale PNG: a ramp from 0 to 65535 left to right
        ramp = np.linspace(0, 65535, width).astype(np.uint16)
        Image.fromarray(np.tile(ramp, (height, 1))).save(path)
    elif mode == "P":
        im = rgb.convert("P")
        im.info["transparency"] = 255  # an unused palette index: nothing is transparent
        im.save(path, transparency=255)
    elif mode == "LA":
        rgb.convert("LA").save(path)
    elif mode == "EXIF":
        # Stored sideways: left half red, right half blue. Orientation 6 means "rotate 90 degrees
        # clockwise to view", which puts red on top.
        a = np.zeros((height, width, 3), np.uint8)
        a[:, : width // 2] = (255, 0, 0)
        a[:, width // 2:] = (0, 0, 255)
        exif = Image.Exif()
        exif[0x0112] = 6
        Image.fromarray(a).save(path, exif=exif, quality=95)


def extension(mode):
    return ".jpg" if mode in ("RGB", "CMYK", "EXIF") else ".png"


def make_karpathy(out, num_images=16, dataset="coco", width=48, height=40, seed=0):
    """Images under out/images (COCO: in train2014/ and val2014/ sub-folders) and
    out/dataset_{dataset}.json. Splits cycle train, val, test, restval. Image 0 has 2 captions,
    image 1 has 7, the rest 5; each image's last caption is 60 words long (dropped at max_len 50).
    Returns the JSON path and the list of image entries."""
    rng = np.random.default_rng(seed)
    splits = ("train", "val", "test", "restval")
    entries = []
    for i in range(num_images):
        mode = MODES[i % len(MODES)]
        sub = ("train2014" if i % 2 == 0 else "val2014") if dataset == "coco" else ""
        os.makedirs(os.path.join(out, "images", sub), exist_ok=True)
        filename = f"img_{i:05d}{extension(mode)}"
        save_image(os.path.join(out, "images", sub, filename), i, mode, width, height)
        n_caps = {0: 2, 1: 7}.get(i, 5)
        sentences = [{"tokens": [str(w) for w in rng.choice(WORDS, size=rng.integers(3, 12))]}
                     for _ in range(n_caps)]
        sentences.append({"tokens": ["long"] * 60})
        entry = {"filename": filename, "split": splits[i % len(splits)], "sentences": sentences,
                 "imgid": i}
        if dataset == "coco":
            entry["filepath"], entry["cocoid"] = sub, 500000 + i
        entries.append(entry)
    path = os.path.join(out, f"dataset_{dataset}.json")
    with open(path, "w") as f:
        json.dump({"images": entries, "dataset": dataset}, f)
    return path, entries


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="write a Karpathy-format test dataset")
    p.add_argument("--out", required=True)
    p.add_argument("--num-images", type=int, default=2000)
    p.add_argument("--dataset", default="coco", choices=["coco", "flickr8k", "flickr30k"])
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--csv", action="store_true", help="also captions.csv, for --dataset custom (flat image folder)")
    a = p.parse_args()
    path, entries = make_karpathy(a.out, a.num_images, a.dataset, a.width, a.height)
    if a.csv:
        import csv
        with open(os.path.join(a.out, "captions.csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows([os.path.join(e.get("filepath", ""), e["filename"]), " ".join(s["tokens"])]
                        for e in entries for s in e["sentences"][:5])
    print(f"wrote {a.num_images} images and {path}")
