"""Prepare a captioning dataset for training: images -> one HDF5 file per split, captions -> encoded
JSON, plus the word map. Sources: Karpathy's split JSON with the COCO / Flickr8k / Flickr30k images,
or the built-in shapes generator. The file layout is sgrvinod's tutorial's (see datasets.py).

    python create_input_files.py --dataset coco --karpathy-json dataset_coco.json \
        --image-folder IMG_DIR --output-folder data/coco
    python create_input_files.py --dataset shapes --output-folder data/shapes
"""
import json
import os
import random
import time
from collections import Counter
from contextlib import ExitStack
from multiprocessing import Pool

import h5py
import numpy as np
from PIL import Image
from tqdm import tqdm

import shapes
from datasets import SPECIAL_TOKENS, SPLITS, Vocabulary, base_name, data_path, load_image
from utils import ArgumentParser, InputError, atomic_path, run_cli, write_json

KARPATHY_SPLITS = {"train": "TRAIN", "restval": "TRAIN", "val": "VAL", "test": "TEST"}


def read_karpathy(json_path, image_folder, dataset):
    """Karpathy's dataset_*.json -> {SPLIT: [(image path, [caption tokens, ...]), ...]}."""
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
        items[KARPATHY_SPLITS[img["split"]]].append((path, [s["tokens"] for s in sentences]))
    return items


def shapes_job(job):
    """Pool worker: (seed, index, image size) -> (scene, its captions)."""
    seed, index, image_size = job
    scene = shapes.make_scene(shapes.scene_seed(seed, index), image_size)
    return scene, shapes.captions(scene)


def make_shapes(num_images, seed, image_size, imap):
    """The built-in dataset: {SPLIT: [(scene, [caption tokens, ...]), ...]}, 10% each for VAL and TEST."""
    n_eval = max(1, num_images // 10)
    scenes = list(imap(shapes_job, [(seed, i, image_size) for i in range(num_images)]))
    return {"TRAIN": scenes[:-2 * n_eval], "VAL": scenes[-2 * n_eval:-n_eval], "TEST": scenes[-n_eval:]}


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
    for split in SPLITS:  # captions longer than max_len go, then images left without captions
        kept = [(src, [c for c in caps if len(c) <= args.max_len]) for src, caps in items[split]]
        items[split] = [(src, caps) for src, caps in kept if caps]
        dropped[split] = len(kept) - len(items[split])
        if not items[split]:
            source = "" if args.dataset == "shapes" else f" in {args.karpathy_json}"
            raise InputError(f"split {split} has no images with captions of at most --max-len "
                             f"{args.max_len} words{source}")
        if args.dataset != "shapes":  # fail on a missing file before hours of decoding, not after
            missing = [p for p, _ in items[split] if not os.path.isfile(p)]
            if missing and not args.skip_bad_images:
                raise InputError(f"image file {missing[0]} not found ({len(missing)} missing in "
                                 f"{split}); check --image-folder, or pass --skip-bad-images")
            bad += [(p, "file not found") for p in missing]
            skipped[split] = len(missing)
            missing = set(missing)
            items[split] = [(p, c) for p, c in items[split] if p not in missing]

    word_map = build_word_map([c for _, caps in items["TRAIN"] for c in caps], args.min_word_freq)
    vocab = Vocabulary(word_map)
    rng = random.Random(args.seed)
    os.makedirs(out, exist_ok=True)
    summary = []
    with ExitStack() as stack:
        tmp = lambda path: stack.enter_context(atomic_path(path))  # renamed when the block succeeds
        write_json(tmp(data_path(out, "WORDMAP", name)), word_map)
        for split in SPLITS:
            sampled = [sample_captions(caps, args.captions_per_image, rng) for _, caps in items[split]]
            jobs = [(source, args.image_size) for source, _ in items[split]]
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
            words = [w for c in captions for w in c]
            unk = sum(w not in word_map for w in words) / len(words)
            summary.append((split, len(kept), len(captions), unk, dropped[split], skipped[split]))
        if args.dataset == "shapes":  # a few TEST images as files, to try caption.py on
            os.makedirs(os.path.join(out, "samples"), exist_ok=True)
            for k, (scene, _) in enumerate(items["TEST"][:8]):
                path = tmp(os.path.join(out, "samples", f"test_{k:02d}.png"))
                Image.fromarray(shapes.render(scene)[0]).save(path, format="PNG")
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
    arg("--dataset", required=True, choices=["coco", "flickr8k", "flickr30k", "shapes"])
    arg("--karpathy-json", help="Karpathy's dataset_{coco,flickr8k,flickr30k}.json")
    arg("--image-folder", help="folder the JSON's file names are relative to")
    arg("--output-folder", required=True)
    arg("--captions-per-image", type=int, default=5)
    arg("--min-word-freq", type=int, default=5, help="keep words seen more often than this in TRAIN")
    arg("--max-len", type=int, default=50, help="drop captions longer than this many words")
    arg("--image-size", type=int, default=None, help="side in pixels (default 256, shapes 64)")
    arg("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes decoding images")
    arg("--seed", type=int, default=123, help="caption sampling, and the shapes scenes")
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
    if args.dataset != "shapes" and not (args.karpathy_json and args.image_folder):
        p.error(f"--dataset {args.dataset} needs --karpathy-json and --image-folder")
    return args


def main():
    args = parse_args()
    t0 = time.time()
    name = base_name(args.dataset, args.captions_per_image, args.min_word_freq)
    out = args.output_folder
    kinds = ("IMAGES", "CAPTIONS", "CAPLENS") + (("BOXES",) if args.dataset == "shapes" else ())
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
        else:
            items = read_karpathy(args.karpathy_json, args.image_folder, args.dataset)
        summary, word_map, bad = prepare(items, args, name, imap)
    seconds = time.time() - t0

    total = sum(row[1] for row in summary)
    print(f"\nprepared {args.dataset} in {out} as {name}")
    print(f"{'split':6s} {'images':>8s} {'captions':>9s} {'unk rate':>9s} {'no caps':>8s} {'skipped':>8s}")
    for split, n_img, n_cap, unk, n_drop, n_bad in summary:
        print(f"{split:6s} {n_img:8d} {n_cap:9d} {unk:9.2%} {n_drop:8d} {n_bad:8d}")
    print(f"vocabulary: {len(word_map) - len(SPECIAL_TOKENS)} words + {len(SPECIAL_TOKENS)} special tokens")
    if bad:
        print(f"skipped {len(bad)} unreadable or missing images, listed in {skipped_list(out, name)}")
    print(f"{seconds:.1f} s, {total / seconds:.0f} images/s with {args.workers} worker(s)")


if __name__ == "__main__":
    run_cli(main)
