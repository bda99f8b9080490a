"""Prepare a captioning dataset for training: images -> one HDF5 file per split, captions -> encoded
JSON, plus the word map and, per split, every raw reference caption. Sources: Karpathy's split JSON
with the COCO / Flickr8k / Flickr30k images, your own images with a CSV or JSON Lines file of
captions, or the built-in shapes generator. The file layout is sgrvinod's tutorial's (see
datasets.py), plus {SPLIT}_REFS_{name}.json.

    python create_input_files.py --dataset coco --karpathy-json dataset_coco.json \
        --image-folder IMG_DIR --output-folder data/coco
    python create_input_files.py --dataset custom --captions captions.csv --image-folder photos \
        --output-folder data/mine [--name mine]
    python create_input_files.py --dataset shapes --output-folder data/shapes
"""
import csv
import json
import os
import random
import string
import time
from collections import Counter
from contextlib import ExitStack
from multiprocessing import Pool
from typing import NamedTuple

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

import shapes
from datasets import SPECIAL_TOKENS, SPLITS, Vocabulary, base_name, data_path, load_image
from utils import ArgumentParser, InputError, atomic_path, run_cli, write_json

KARPATHY_SPLITS = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}


class Entry(NamedTuple):
    """One image to prepare."""
    source: object  # the image file's path, or a shapes scene (dict)
    captions: list  # its captions as token lists
    image_id: object  # COCO cocoid, Flickr file name, custom: path below the image folder, shapes: index in split


def tokenize(caption):
    """The rule for captions given as text (custom data), Karpathy's: lower case, punctuation
    deleted (so "T-shirt" is "tshirt" and "dog's" is "dogs"), split on white space. No downloads."""
    return caption.lower().translate(str.maketrans("", "", string.punctuation)).split()


def read_karpathy(json_path, image_folder, dataset):
    """Karpathy's dataset_*.json -> {SPLIT: [Entry, ...]}."""
    if not os.path.isfile(json_path):
        raise InputError(f"{json_path} not found: download Karpathy's caption_datasets.zip (see README)")
    if not os.path.isdir(image_folder):
        raise InputError(f"image folder {image_folder} not found")
    try:
        with open(json_path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{json_path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"{json_path} has no top-level 'images' list: expected Karpathy's "
                         f"dataset_{dataset}.json")
    keys = ("split", "filename", "sentences") + (("filepath",) if dataset == "coco" else ())
    items = {s: [] for s in SPLITS}
    for i, img in enumerate(data["images"]):
        where = f"{json_path}: image {i}"
        if not isinstance(img, dict):
            raise InputError(f"{where} is not an object")
        for key in keys:
            if key not in img:
                raise InputError(f"{where} has no {key!r} key (Karpathy {dataset} format needs "
                                 f"{', '.join(keys)})")
        if img["split"] not in KARPATHY_SPLITS:
            raise InputError(f"{where} has split {img['split']!r}; expected one of "
                             f"{', '.join(KARPATHY_SPLITS)}")
        sentences = img["sentences"]
        if not isinstance(sentences, list) or not all(
                isinstance(s, dict) and isinstance(s.get("tokens"), list) for s in sentences):
            raise InputError(f"{where}: 'sentences' must be a list of objects with a 'tokens' list")
        parts = (img["filepath"], img["filename"]) if dataset == "coco" else (img["filename"],)
        path = os.path.join(image_folder, *parts)
        image_id = img.get("cocoid", img["filename"]) if dataset == "coco" else img["filename"]
        items[KARPATHY_SPLITS[img["split"]]].append(Entry(path, [s["tokens"] for s in sentences], image_id))
    return items


def read_custom(captions_file, image_folder, ratios, seed):
    """Your own captions: a CSV file with a header (image, caption, optional split; one row per
    caption) or JSON Lines ({"image": ..., "caption": ...} or {"image": ..., "captions": [...]},
    optional "split"). Images without a split are assigned by `seed`, in the proportions `ratios`
    (TRAIN, VAL, TEST), per image. Returns {SPLIT: [Entry, ...]}, images in order of first mention."""
    if not os.path.isfile(captions_file):
        raise InputError(f"captions file {captions_file} not found")
    with open(captions_file, "rb") as f:
        empty = not f.read(4096).strip()
    if empty:
        raise InputError(f"captions file {captions_file} is empty: give it a header line (image,caption,split) "
                         "and a line per caption, or a JSON object per line (.jsonl)")
    if not os.path.isdir(image_folder):
        raise InputError(f"image folder {image_folder} not found")
    json_lines = captions_file.lower().endswith((".jsonl", ".json"))
    rows = _json_lines(captions_file) if json_lines else _csv_rows(captions_file)
    captions, splits = {}, {}
    for where, image, texts, split in rows:
        if not isinstance(image, str) or not image.strip():
            raise InputError(f"{where}: the image name is missing or empty")
        image = os.path.normpath(image.strip())
        for text in texts:
            if not isinstance(text, str) or not tokenize(text):
                raise InputError(f"{where}: empty caption for {image} (give it words, or remove the row)")
        captions.setdefault(image, []).extend(tokenize(t) for t in texts)
        if split is not None and str(split).strip():
            name = str(split).strip().lower()
            if name not in KARPATHY_SPLITS:
                raise InputError(f"{where}: unknown split {split!r} for {image}; use train, val or test "
                                 "(or leave it empty to assign one)")
            if splits.setdefault(image, KARPATHY_SPLITS[name]) != KARPATHY_SPLITS[name]:
                raise InputError(f"{where}: {image} is in split {splits[image]} on an earlier line and "
                                 f"{KARPATHY_SPLITS[name]} here: one image, one split")
    if not captions:
        raise InputError(f"{captions_file} has no captions")
    free = sorted(image for image in captions if image not in splits)
    random.Random(seed).shuffle(free)
    n_val, n_test = round(len(free) * ratios[1]), round(len(free) * ratios[2])
    for k, image in enumerate(free):
        splits[image] = "VAL" if k < n_val else "TEST" if k < n_val + n_test else "TRAIN"
    items = {s: [] for s in SPLITS}
    for image, caps in captions.items():
        items[splits[image]].append(Entry(os.path.join(image_folder, image), caps, image))
    for split in SPLITS:
        if not items[split]:
            raise InputError(f"split {split} has no images ({len(captions)} images in {captions_file}): "
                             "add images, give some rows that split, or change --split-ratios")
    return items


def _csv_rows(path):
    """(where, image, [caption], split) per row of a CSV file with a header."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            for column in ("image", "caption"):
                if column not in header:
                    raise InputError(f"{path}: no {column!r} column in the header {header}: a CSV needs "
                                     "image,caption (and optionally split)")
            for row in reader:
                yield f"{path}:{reader.line_num}", row["image"], [row["caption"]], row.get("split")
    except (csv.Error, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not a CSV file ({e}); give a CSV with an image,caption header, or a "
                         ".jsonl file") from None


def _json_lines(path):
    """(where, image, [captions], split) per line of a JSON Lines file."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{where} is not JSON ({e.msg}); each line must be one object") from None
                if not isinstance(record, dict) or "image" not in record or not (
                        "caption" in record or "captions" in record):
                    raise InputError(f'{where}: expected {{"image": ..., "caption": "..."}} or '
                                     f'{{"image": ..., "captions": [...]}}')
                texts = record["captions"] if "captions" in record else [record["caption"]]
                if not isinstance(texts, list) or not texts:
                    raise InputError(f"{where}: 'captions' must be a non-empty list of strings")
                yield where, record["image"], texts, record.get("split")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not a text file ({e})") from None


def shapes_job(job):
    """Pool worker: (seed, index, image size) -> (scene, its captions)."""
    seed, index, image_size = job
    scene = shapes.make_scene(shapes.scene_seed(seed, index), image_size)
    return scene, shapes.captions(scene)


def make_shapes(num_images, seed, image_size, imap):
    """The built-in dataset: {SPLIT: [(scene, [caption tokens, ...]), ...]}, 10% each for VAL and TEST."""
    n_eval = max(1, num_images // 10)
    scenes = list(imap(shapes_job, [(seed, i, image_size) for i in range(num_images)]))
    parts = {"TRAIN": scenes[:-2 * n_eval], "VAL": scenes[-2 * n_eval:-n_eval], "TEST": scenes[-n_eval:]}
    return {split: [Entry(scene, caps, k) for k, (scene, caps) in enumerate(part)] for split, part in parts.items()}


def build_word_map(captions, min_word_freq):
    """Words seen more than min_word_freq times in TRAIN, most frequent first; <pad> = 0 and the other
    special tokens at the end, as in the tutorial. The tutorial counts words over every split and
    numbers them in order of first appearance, so its vocabularies differ from these (its COCO word
    map has 9490 entries); data prepared there still loads here, and the other way round."""
    freq = Counter(w for c in captions for w in c)
    words = sorted((w for w, n in freq.items() if n > min_word_freq), key=lambda w: (-freq[w], w))
    words = [w for w in words if w not in SPECIAL_TOKENS]
    word_map = {w: i + 1 for i, w in enumerate(words)}
    for t in ("<unk>", "<start>", "<end>"):
        word_map[t] = len(word_map) + 1
    word_map["<pad>"] = 0
    return word_map


def sample_captions(caps, k, rng):
    """Exactly k captions: all of them plus random repeats if there are fewer, a random k if more."""
    if len(caps) < k:
        return caps + [rng.choice(caps) for _ in range(k - len(caps))]
    return rng.sample(caps, k)


def load_job(job):
    """Pool worker: (image path or shapes scene, size) -> (3 x size x size uint8, boxes, error)."""
    source, size = job
    if isinstance(source, dict):
        image, objmap = shapes.render(source)
        return image.transpose(2, 0, 1).copy(), shapes.boxes(source, objmap), None
    try:
        return load_image(source, size), None, None
    except Exception as e:  # anything Pillow raises on a bad file; reported with the path
        return None, None, f"{type(e).__name__}: {e}"


def write_images(path, jobs, args, imap, desc):
    """Decode (or render) every job in order into a chunked HDF5 file. Returns the indices of the jobs
    kept, their boxes and the (source, error) pairs of the skipped ones."""
    size = args.image_size
    kept, boxes, bad = [], [], []
    with h5py.File(path, "w") as h:
        h.attrs["captions_per_image"] = args.captions_per_image
        images = h.create_dataset("images", (len(jobs), 3, size, size), np.uint8, track_times=False,
                                  maxshape=(None, 3, size, size), chunks=(1, 3, size, size))
        results = tqdm(imap(load_job, jobs), total=len(jobs), unit="img", desc=desc)
        for i, (image, obj_boxes, error) in enumerate(results):
            if error is not None:
                if not args.skip_bad_images:
                    raise InputError(f"{jobs[i][0]}: cannot read image ({error}); replace or remove "
                                     "it, or pass --skip-bad-images")
                bad.append((jobs[i][0], error))
                continue
            images[len(kept)] = image
            kept.append(i)
            boxes.append(obj_boxes)
        images.resize(len(kept), axis=0)
    return kept, boxes, bad


def skipped_list(out, name):
    return os.path.join(out, f"SKIPPED_IMAGES_{name}.txt")


def prepare(items, args, name, imap):
    """Filter captions, build the word map, write every split. Files appear under their real names
    only once all are written (the word map last, so its presence means the set is complete)."""
    out = args.output_folder
    dropped, skipped, bad = Counter(), Counter(), []
    references = {}  # per split and image: every caption, none dropped (the REFS file)
    for split in SPLITS:  # captions longer than max_len go, then images left without captions
        references[split] = {e.image_id: [" ".join(c).lower() for c in e.captions] for e in items[split]}
        kept = [e._replace(captions=[c for c in e.captions if len(c) <= args.max_len]) for e in items[split]]
        items[split] = [e for e in kept if e.captions]
        dropped[split] = len(kept) - len(items[split])
        if not items[split]:
            source = {"shapes": "", "custom": f" in {args.captions}"}.get(args.dataset, f" in {args.karpathy_json}")
            raise InputError(f"split {split} has no images with captions of at most --max-len "
                             f"{args.max_len} words{source}")
        if args.dataset != "shapes":  # fail on a missing file before hours of decoding, not after
            missing = [e.source for e in items[split] if not os.path.isfile(e.source)]
            if missing and not args.skip_bad_images:
                raise InputError(f"image file {missing[0]} not found ({len(missing)} missing in "
                                 f"{split}); check --image-folder, or pass --skip-bad-images")
            bad += [(p, "file not found") for p in missing]
            skipped[split] = len(missing)
            missing = set(missing)
            items[split] = [e for e in items[split] if e.source not in missing]

    word_map = build_word_map([c for e in items["TRAIN"] for c in e.captions], args.min_word_freq)
    vocab = Vocabulary(word_map)
    rng = random.Random(args.seed)
    os.makedirs(out, exist_ok=True)
    summary = []
    with ExitStack() as stack:
        tmp = lambda path: stack.enter_context(atomic_path(path))  # renamed when the block succeeds
        write_json(tmp(data_path(out, "WORDMAP", name)), word_map)
        for split in SPLITS:
            sampled = [sample_captions(e.captions, args.captions_per_image, rng) for e in items[split]]
            jobs = [(e.source, args.image_size) for e in items[split]]
            kept, boxes, split_bad = write_images(tmp(data_path(out, "IMAGES", name, split)), jobs,
                                                  args, imap, desc=split)
            if not kept:
                raise InputError(f"split {split}: no readable image left")
            bad += split_bad
            skipped[split] += len(split_bad)
            captions = [c for i in kept for c in sampled[i]]
            write_json(tmp(data_path(out, "CAPTIONS", name, split)),
                       [vocab.encode(c, args.max_len) for c in captions])
            write_json(tmp(data_path(out, "CAPLENS", name, split)), [len(c) + 2 for c in captions])
            if args.dataset == "shapes":
                write_json(tmp(data_path(out, "BOXES", name, split)), boxes)
            write_json(tmp(data_path(out, "REFS", name, split)), [
                {"image_id": e.image_id, "file": e.source if isinstance(e.source, str) else None,
                 "references": references[split][e.image_id]} for e in (items[split][i] for i in kept)])
            words = [w for c in captions for w in c]
            unk = sum(w not in word_map for w in words) / len(words)
            summary.append((split, len(kept), len(captions), unk, dropped[split], skipped[split]))
        if args.dataset == "shapes":  # a few TEST images as files, to try caption.py on
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            for k, entry in enumerate(items["TEST"][:8]):
                path = tmp(os.path.join(out, "samples", f"test_{k:02d}.png"))
                Image.fromarray(shapes.render(entry.source)[0]).save(path, format="PNG")
        skipped_path = skipped_list(out, name)
        if bad:
            with open(tmp(skipped_path), "w") as f:
                f.writelines(f"{p}\t{err}\n" for p, err in bad)
        elif os.path.exists(skipped_path):
            os.remove(skipped_path)  # a stale list from an earlier run of the same name
    return summary, word_map, bad


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    arg = p.add_argument
    arg("--dataset", required=True, choices=["coco", "flickr8k", "flickr30k", "custom", "shapes"])
    arg("--karpathy-json", help="Karpathy's dataset_{coco,flickr8k,flickr30k}.json")
    arg("--captions", help="custom: a CSV (image,caption[,split]) or JSON Lines file of captions")
    arg("--image-folder", help="folder the image names are relative to")
    arg("--name", default="custom", help="custom: the start of the prepared files' base name")
    arg("--split-ratios", type=float, nargs=3, default=[0.8, 0.1, 0.1], metavar=("TRAIN", "VAL", "TEST"),
        help="custom: shares of the images without a split, assigned by --seed")
    arg("--output-folder", required=True)
    arg("--captions-per-image", type=int, default=5)
    arg("--min-word-freq", type=int, default=5, help="keep words seen more often than this in TRAIN")
    arg("--max-len", type=int, default=50, help="drop captions longer than this many words")
    arg("--image-size", type=int, default=None, help="side in pixels (default 256, shapes 64)")
    arg("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes decoding images")
    arg("--seed", type=int, default=123, help="caption sampling, custom splits, shapes scenes")
    arg("--num-images", type=int, default=10000, help="shapes only: images in all splits together")
    arg("--skip-bad-images", action="store_true", help="skip unreadable or missing images, listed "
                                                     "in SKIPPED_IMAGES_{name}.txt")
    arg("--overwrite", action="store_true", help="replace prepared files already present")
    args = p.parse_args(argv)
    if args.image_size is None:
        args.image_size = 64 if args.dataset == "shapes" else 256
    for name, low in (("captions_per_image", 1), ("max_len", 1), ("min_word_freq", 0),
                      ("workers", 1), ("image_size", 32 if args.dataset == "shapes" else 1),
                      ("num_images", 3)):
        if getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}, got {getattr(args, name)}")
    if args.dataset == "custom" and not (args.captions and args.image_folder):
        p.error("--dataset custom needs --captions and --image-folder")
    elif args.dataset not in ("shapes", "custom") and not (args.karpathy_json and args.image_folder):
        p.error(f"--dataset {args.dataset} needs --karpathy-json and --image-folder")
    if min(args.split_ratios) < 0 or abs(sum(args.split_ratios) - 1) > 1e-6:
        p.error(f"--split-ratios must be three shares >= 0 that add up to 1, got {args.split_ratios}")
    if not args.name or os.sep in args.name:
        p.error(f"--name must be a plain file-name part, got {args.name!r}")
    return args


def main():
    args = parse_args()
    t0 = time.time()
    name = base_name(args.name if args.dataset == "custom" else args.dataset, args.captions_per_image,
                     args.min_word_freq)
    out = args.output_folder
    kinds = ("IMAGES", "CAPTIONS", "CAPLENS", "REFS") + (("BOXES",) if args.dataset == "shapes" else ())
    outputs = [data_path(out, k, name, s) for s in SPLITS for k in kinds] + [data_path(out, "WORDMAP", name)]
    for path in outputs:
        if os.path.exists(path) and not args.overwrite:
            raise InputError(f"{path} already exists: pass --overwrite to replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"output folder {out} is a file")

    with Pool(args.workers) if args.workers > 1 else ExitStack() as pool:
        imap = (lambda f, jobs: pool.imap(f, jobs, chunksize=16)) if args.workers > 1 else map
        if args.dataset == "shapes":
            items = make_shapes(args.num_images, args.seed, args.image_size, imap)
        elif args.dataset == "custom":
            items = read_custom(args.captions, args.image_folder, args.split_ratios, args.seed)
        else:
            items = read_karpathy(args.karpathy_json, args.image_folder, args.dataset)
        summary, word_map, bad = prepare(items, args, name, imap)
    seconds = time.time() - t0

    total = sum(row[1] for row in summary)
    print(f"\nprepared {args.dataset} in {out} as {name}")
    print(f"{'split':6s} {'images':>8s} {'captions':>9s} {'unk rate':>9s} {'no caps':>8s} {'skipped':>8s}")
    for split, n_img, n_cap, unk, n_drop, n_bad in summary:
        print(f"{split:6s} {n_img:8d} {n_cap:9d} {unk:9.2%} {n_drop:8d} {n_bad:8d}")
    print(f"vocabulary: {len(word_map) - len(SPECIAL_TOKENS)} words + {len(SPECIAL_TOKENS)} special tokens, "
          f"the words seen in TRAIN more than {args.min_word_freq} time(s); the unk rate is the share of each "
          "split's words outside it (VAL and TEST words that TRAIN lacks, and rare words)")
    if bad:
        print(f"skipped {len(bad)} unreadable or missing images, listed in {skipped_list(out, name)}")
    print(f"{seconds:.1f} s, {total / seconds:.0f} images/s with {args.workers} worker(s)")


if __name__ == "__main__":
    run_cli(main)
