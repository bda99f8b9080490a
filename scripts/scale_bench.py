"""What the reference experiment costs at COCO's size, stage by stage, without COCO: a COCO-shaped
dataset is made up and every stage that needs no GPU runs on it, with its wall time, peak memory and
the bytes it reads and writes.

    python scripts/scale_bench.py --num-images 1000 --out /tmp/scale1k           # a minute or two
    python scripts/scale_bench.py --num-images 123287 --out /tmp/scale --stages prepare loader0
    python scripts/scale_bench.py --table /tmp/scale1k/scale.json /tmp/scale/scale.json   # side by side

The data: Karpathy's JSON layout with COCO's split shares (of 123,287 images: 82,783 train, 30,504
restval, 5,000 val, 5,000 test), 5 captions per image (a few 6 or 7, as COCO), caption lengths of
mean about 10.5 words with a tail to 50, words drawn from a Zipf distribution whose vocabulary at
--min-word-freq 5 is about 9,500 words at full size. The photos are JPEGs of --width x --height
pixels (default 320 x 240, a quarter of COCO's 640 x 480, to save disk; preparation resizes both to
256 x 256, so only the decoding cost of the files differs), textured so that they compress like
photos.

Stages (each in its own process; peak memory is that process tree's largest resident set):
  prepare      create_input_files.py --dataset coco on the made-up data
  startup      train.py up to its first optimiser step (word map, captions, datasets), a tiny model
  loader0/2    one epoch of the training DataLoader over the HDF5 images, 0 and 2 workers
  cache        the feature cache of ResNet-101 at 256 px for --cache-images TRAIN images, extrapolated
  metrics      eval.py's coco-caption metrics on the TEST images against every reference (captions given)
  reward       self-critical training's reward set-up on all TRAIN references, and one step's reward
  compare      compare.py and report.html over two runs' results on every TEST image (made up, not decoded)
  significance the paired bootstrap of compare.py's intervals: two runs on COCO's 5,000 TEST images, 1,000
               resamples, every metric (made-up per-image statistics; this stage needs no prepared data)
Bytes read and written are those of the files each stage reads and writes (their sizes).
"""
import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from multiprocessing import Pool

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository's modules, also without `pip install -e .`

COCO = {"train": 82783, "restval": 30504, "val": 5000, "test": 5000}  # Karpathy's COCO splits
VOCABULARY, ZIPF = 40000, 1.405  # a Zipf law over 40,000 words: about 9,500 occur more than 5 times at full size
NAME = "coco_5_cap_per_img_5_min_word_freq"
STAGES = ("prepare", "startup", "loader0", "loader2", "cache", "metrics", "reward", "compare", "significance")


def caption_lengths(rng, n):
    """COCO-like caption lengths: mostly 8 to 13 words, mean about 10.5, a few long ones up to 50."""
    lengths = np.clip(np.rint(rng.lognormal(np.log(10.1), 0.22, n)), 6, 50)
    tail = rng.random(n) < 0.003
    lengths[tail] = rng.integers(20, 51, tail.sum())
    return lengths.astype(int)


def photo(job):
    """Pool worker: write one textured JPEG."""
    path, index, width, height = job
    from PIL import Image
    rng = np.random.default_rng(index)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    texture = np.asarray(Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    noise = rng.integers(-12, 13, (height, width, 3), dtype=np.int16)
    Image.fromarray(np.clip(texture + noise, 0, 255).astype(np.uint8)).save(path, quality=85)


def make_data(out, n, width, height, workers):
    """out/images/{train2014,val2014}/*.jpg and out/dataset_coco.json, COCO-shaped; made once per size."""
    marker = os.path.join(out, "made.json")
    if os.path.exists(marker) and json.load(open(marker)) == {"images": n, "width": width, "height": height}:
        return
    rng = np.random.default_rng(0)
    shares = {s: round(n * c / sum(COCO.values())) for s, c in COCO.items() if s != "train"}
    shares = {"train": n - sum(shares.values()), **shares}
    splits = [s for s, c in shares.items() for _ in range(c)]
    per_image = rng.choice([5, 6, 7], size=n, p=[0.99725, 0.0025, 0.00025])
    weights = 1.0 / np.arange(1, VOCABULARY + 1) ** ZIPF
    lengths = caption_lengths(rng, int(per_image.sum()))
    words = rng.choice(VOCABULARY, size=int(lengths.sum()), p=weights / weights.sum())
    names = np.array([f"w{k}" for k in range(VOCABULARY)])
    images, jobs, at, sentence = [], [], 0, 0
    for i in range(n):
        folder = "train2014" if splits[i] == "train" else "val2014"
        filename = f"COCO_{folder}_{i:012d}.jpg"
        sentences = []
        for _ in range(per_image[i]):
            tokens = names[words[at:at + lengths[sentence]]].tolist()
            at, sentence = at + lengths[sentence], sentence + 1
            sentences.append({"tokens": tokens, "raw": " ".join(tokens).capitalize() + ".", "imgid": i,
                              "sentid": sentence})
        images.append({"filepath": folder, "filename": filename, "split": splits[i], "cocoid": i, "imgid": i,
                       "sentences": sentences})
        jobs.append((os.path.join(out, "images", folder, filename), i, width, height))
    for folder in ("train2014", "val2014"):
        os.makedirs(os.path.join(out, "images", folder), exist_ok=True)
    with Pool(workers) as pool:
        for _ in tqdm(pool.imap_unordered(photo, jobs, chunksize=64), total=n, desc="photos", unit="img"):
            pass
    with open(os.path.join(out, "dataset_coco.json"), "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    with open(marker, "w") as f:
        json.dump({"images": n, "width": width, "height": height}, f)


def tqdm(iterable, **kw):
    from tqdm import tqdm as bar
    return bar(iterable, leave=False, **kw)


def size_of(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def measured(cmd, cwd=ROOT):
    """Run a command; its wall seconds, peak resident MiB (largest process of its tree) and output."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, stdout=subprocess.PIPE, text=True)  # bars on stderr
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"error: {' '.join(map(str, cmd))} failed ({proc.returncode}):\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024, output


def stage_in_process(name, args):
    """A stage run by this script in a child process: its own report, plus time and memory."""
    seconds, mib, output = measured([sys.executable, __file__, "--out", args.out, "--num-images", args.num_images,
                                     "--cache-images", args.cache_images, "--run-stage", name])
    return {"seconds": seconds, "peak_mib": mib, **json.loads(output.strip().splitlines()[-1])}


def prepared(args):
    return os.path.join(args.out, "prepared")


def run_prepare(args):
    out = prepared(args)
    seconds, mib, output = measured([sys.executable, "create_input_files.py", "--dataset", "coco", "--karpathy-json",
                                     os.path.join(args.out, "dataset_coco.json"), "--image-folder",
                                     os.path.join(args.out, "images"), "--output-folder", out, "--workers",
                                     args.workers, "--overwrite"])
    vocabulary = next(line for line in output.splitlines() if line.startswith("vocabulary:"))
    return {"seconds": seconds, "peak_mib": mib, "read_mb": (size_of(os.path.join(args.out, "images")) + size_of(
        os.path.join(args.out, "dataset_coco.json"))) / 1e6, "written_mb": size_of(out) / 1e6,
        "note": f"{vocabulary}; {args.workers} workers"}


def run_startup(args):
    run = os.path.join(args.out, "runs", "startup")
    cmd = [sys.executable, "train.py", "--decoder", "attention", "--data_folder", prepared(args), "--data_name", NAME,
           "--encoder", "resnet18", "--encoder_weights", "none", "--encoder_stages", 1, "--encoded_size", 4,
           "--emb_dim", 32, "--decoder_dim", 32, "--attention_dim", 32, "--cache_features", "false", "--amp", "false",
           "--workers", 0, "--max_steps", 1, "--epochs", 1, "--log_every", 1, "--out", run, "--overwrite"]
    seconds, mib, _ = measured(cmd)
    read = sum(size_of(os.path.join(prepared(args), f"{s}_{k}_{NAME}.json")) for s in ("TRAIN", "VAL")
               for k in ("CAPTIONS", "CAPLENS"))
    return {"seconds": seconds, "peak_mib": mib, "read_mb": read / 1e6,
            "note": "a tiny model on the CPU: data structures, not the ResNet"}


def scored_row(index, image_id, words, references, rng, attention=None):
    """An ImageRow with every statistic eval.py keeps, made up from a caption and its references: nltk's
    BLEU counts stand in for coco-caption's (the same shape), METEOR's statistics follow the unigram
    matches. Their values do not change what resampling them costs."""
    from metrics import nltk_counts
    from results import ImageRow
    counts = nltk_counts([r.split() for r in references], words)
    matched, ref_len = counts["correct"][0], counts["ref_len"]
    function = min(2, matched)
    meteor = [len(words), ref_len, min(2, len(words)), min(2, ref_len), matched - function, matched - function,
              function, function] + [0.0] * 12 + [float(min(matched, 1 + rng.randrange(3))), matched, matched]
    return ImageRow(index, image_id, " ".join(words), rng.random() * 3, rng.random() < 0.1, bleu=counts,
                    nltk_bleu=counts, ROUGE_L=rng.random(), meteor=[float(x) for x in meteor], attention=attention)


def run_compare(args):
    """Two made-up runs with results on every TEST image (the attention run with 14 x 14 maps)."""
    from models import decoder_class
    from results import FORMAT, BeamResult, EvalResults, ImageTable, file_names, write
    from results import attention_bytes
    refs = json.load(open(os.path.join(prepared(args), f"TEST_REFS_{NAME}.json")))
    rng = random.Random(0)
    runs = []
    for decoder in ("rnn", "attention"):
        folder = os.path.join(args.out, "runs", f"compare-{decoder}")
        os.makedirs(folder, exist_ok=True)
        cfg = {"decoder": decoder, "patience": 3, "epochs": 10, "log_every": 50, "objective": "xe"}
        with open(os.path.join(folder, "config.yaml"), "w") as f:
            json.dump(cfg, f)  # JSON is YAML
        with open(os.path.join(folder, "log.jsonl"), "w") as f:
            for epoch in range(1, 11):
                f.write(json.dumps({"kind": "step", "step": epoch * 100, "loss": 3 - epoch / 10}) + "\n")
                f.write(json.dumps({"kind": "epoch", "epoch": epoch, "step": epoch * 100, "val_loss": 3 - epoch / 10,
                                    "val_top5": 0.7, "val_bleu4": 0.2, "images_per_s": 500.0, "epoch_time_s": 600.0,
                                    "peak_memory_mb": 4000.0, "best": True}) + "\n")
        rows = []
        for i, ref in enumerate(refs):
            words = rng.choice(ref["references"]).split()
            rows.append(scored_row(i, ref["image_id"], words, ref["references"], rng,
                                   attention_bytes(np.random.default_rng(i).random((len(words), 196)))
                                   if decoder_class(decoder).returns_maps else None))
        path = os.path.join(folder, "eval_TEST.json")
        captions_file, images_file = file_names(path, 3)
        metrics = {"BLEU-1": 0.7, "BLEU-2": 0.5, "BLEU-3": 0.35, "BLEU-4": 0.25, "CIDEr": 0.9, "METEOR": 0.23,
                   "ROUGE-L": 0.5, "nltk BLEU-4": 0.25, "exact_match": 0.1}
        result = EvalResults(os.path.join(folder, "best.pt"), decoder, 10, "TEST", len(refs), prepared(args), NAME,
                             decoder, 20_000_000, {"kind": "raw", "per_image_min": 5, "per_image_max": 7,
                                                   "per_image_mean": 5.0}, cfg,
                             {3: BeamResult(3, metrics, 100.0, 50.0, 50, 0.0, 0, captions_file, images_file)},
                             format=FORMAT)
        write(path, result, {3: [{"image_id": r.image_id, "caption": r.caption} for r in rows]},
              {3: ImageTable("TEST", 3, 14 if decoder_class(decoder).returns_maps else None, rows)})
        runs.append(folder)
    report = os.path.join(args.out, "report")
    seconds, mib, _ = measured([sys.executable, "compare.py", *runs, "--out", report])
    read = sum(size_of(r) for r in runs) + size_of(os.path.join(prepared(args), f"TEST_IMAGES_{NAME}.hdf5"))
    return {"seconds": seconds, "peak_mib": mib, "written_mb": size_of(report) / 1e6, "read_mb": read / 1e6,
            "note": f"report.html {os.path.getsize(os.path.join(report, 'report.html')) / 1e6:.1f} MB, "
                    f"{len(refs)} TEST images"}


# ----------------------------------------------------------------------------- stages run in a child process

def loader_epoch(args, workers):
    import torch
    from torch.utils.data import DataLoader

    from datasets import CaptionDataset
    from distributed import EpochSampler
    train = CaptionDataset(prepared(args), NAME, "TRAIN")
    sampler = EpochSampler(train.num_images, train.cpi, 0, 0, 32)
    loader = DataLoader(train, batch_size=32, sampler=sampler, num_workers=workers)
    t0, items = time.perf_counter(), 0
    for batch in tqdm(loader, desc=f"epoch, {workers} workers", unit="batch"):
        items += len(batch.image)
    seconds = time.perf_counter() - t0
    per_item = 3 * train.image_size ** 2  # uint8 pixels of one image, read once per caption
    del torch
    return {"read_mb": items * per_item / 1e6, "note": f"{items} captions, {items / seconds:.0f} captions/s, "
                                                        f"{per_item / 1e3:.0f} KB read per caption"}


def cache_sizes(args):
    """ResNet-101 at 256 px (random weights: the size and time do not depend on them) on the first
    TRAIN images: the new cache's grid and the old layout's pooled cells, per image and for TRAIN."""
    import torch

    from datasets import CaptionDataset
    from encoder import Encoder
    train = CaptionDataset(prepared(args), NAME, "TRAIN")
    encoder = Encoder("resnet101", "none", encoded_size=14, stages=4).eval()
    images = torch.from_numpy(train._images()[: args.cache_images])
    t0 = time.perf_counter()
    with torch.no_grad():
        grid = torch.cat([encoder.cache_grid(images[s:s + 8]) for s in range(0, len(images), 8)])
    seconds = time.perf_counter() - t0
    path = os.path.join(args.out, "cache_sample.npy")
    np.save(path, grid.half().numpy())
    new = os.path.getsize(path) / len(images)
    old = 2 * 196 * 2048  # N x P x D float16, as caches were written before the grid layout
    full = COCO["train"] + COCO["restval"]
    return {"written_mb": os.path.getsize(path) / 1e6, "grid": list(grid.shape[1:]), "bytes_per_image": new,
            "old_bytes_per_image": old, "train_gb": new * train.num_images / 1e9,
            "coco_train_gb": new * full / 1e9, "old_coco_train_gb": old * full / 1e9,
            "note": f"{tuple(grid.shape[1:])} per image: {new / 1e3:.0f} KB (was {old / 1e3:.0f} KB at 14 x 14); "
                    f"COCO TRAIN {new * full / 1e9:.1f} GB (was {old * full / 1e9:.1f}); encoding "
                    f"{len(images) / seconds:.1f} images/s on this CPU"}


def metrics_test(args):
    """coco-caption on every TEST image against all its references, for captions made from them (one
    reference with a word dropped), so the scores are realistic and nothing is decoded."""
    from metrics import coco_metrics
    refs = json.load(open(os.path.join(prepared(args), f"TEST_REFS_{NAME}.json")))
    rng = random.Random(0)
    references, captions = {}, {}
    for i, ref in enumerate(refs):
        references[i] = ref["references"]
        words = rng.choice(ref["references"]).split()
        del words[rng.randrange(len(words))]
        captions[i] = " ".join(words)
    seconds = {}
    scores, unavailable, _ = coco_metrics(references, {"run": captions}, seconds=seconds)
    parts = ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items())
    return {"parts": seconds, "note": f"{len(refs)} images, {sum(map(len, references.values()))} references: {parts}"
                                      + (f"; {', '.join(unavailable)} unavailable" if unavailable else "")}


def reward_setup(args):
    import torch

    from datasets import CaptionDataset
    from objectives import Reward, train_references
    t0 = time.perf_counter()
    train = CaptionDataset(prepared(args), NAME, "TRAIN")
    loaded = time.perf_counter()
    reward = Reward(train_references(train))
    ready = time.perf_counter()
    rng = random.Random(0)
    words = range(4, int(train.captions.max()) + 1)
    captions = [[rng.choice(words) for _ in range(rng.randint(8, 16))] for _ in range(32 * 5)]
    images = [rng.randrange(train.num_images) for _ in range(32) for _ in range(5)]
    times = []
    for _ in range(5):
        s = time.perf_counter()
        reward(captions, images)
        times.append(time.perf_counter() - s)
    del torch
    return {"setup_s": ready - loaded, "step_ms": 1000 * sorted(times)[2],
            "note": f"set-up {ready - loaded:.1f} s over {train.num_images} images (after {loaded - t0:.1f} s "
                    f"loading the captions); a step's reward, 32 images x 5 samples: {1000 * sorted(times)[2]:.1f} ms"}


def significance_test(args, images=5000):
    """compare.py's intervals for two runs on COCO's 5,000 TEST images: the resample counts, both runs'
    statistics resampled, and a margin per metric (made-up captions of a Zipf vocabulary)."""
    import significance
    from report import QUALITY
    rng = random.Random(0)
    zipf = np.random.default_rng(0)
    sentence = lambda: [f"w{k}" for k in zipf.zipf(ZIPF, rng.randint(8, 13)) % 2000]  # noqa: E731
    references = [[" ".join(sentence()) for _ in range(5)] for _ in range(images)]
    runs = [[scored_row(i, i, rng.choice(refs).split()[:-1] if k else sentence(), refs, rng)
             for i, refs in enumerate(references)] for k in (0, 1)]
    t0 = time.perf_counter()
    counts = significance.resample_counts(images)
    drawn = time.perf_counter()
    draws = [significance.replicates(rows, QUALITY, counts) for rows in runs]
    resampled = time.perf_counter()
    for name in draws[0]:
        significance.margin([draws[0][name][0]], [draws[1][name][0]], [draws[0][name]], [draws[1][name]])
    done = time.perf_counter()
    return {"bootstrap_s": done - t0, "note": f"{images} images x {significance.RESAMPLES} resamples, {len(draws[0])} "
            f"metrics, two runs: {done - t0:.2f} s ({drawn - t0:.2f} s drawing the counts, {resampled - drawn:.2f} s "
            f"resampling both runs, {done - resampled:.2f} s the margins)"}


IN_PROCESS = {"loader0": lambda a: loader_epoch(a, 0), "loader2": lambda a: loader_epoch(a, 2), "cache": cache_sizes,
              "metrics": metrics_test, "reward": reward_setup, "significance": significance_test}
RUNS = {"prepare": run_prepare, "startup": run_startup, "compare": run_compare}


def table(reports):
    """Markdown: one row per stage, one column group per size, and how the time grows with N."""
    sizes = [r["num_images"] for r in reports]
    head = ["stage"] + [f"N = {n:,}: s / peak MiB / read MB / written MB" for n in sizes]
    if len(reports) > 1:
        head.append(f"time grows as N^x ({sizes[-2]:,} -> {sizes[-1]:,})")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in STAGES:
        cells, times = [], []
        for r in reports:
            s = r["stages"].get(stage)
            if s is None:
                cells.append("n/a")
                times.append(None)
                continue
            cells.append(f"{s['seconds']:.1f} / {s['peak_mib']:.0f} / {s.get('read_mb', 0):.0f} / "
                         f"{s.get('written_mb', 0):.0f}")
            times.append(s["seconds"])
        if len(reports) > 1:
            a, b = times[-2], times[-1]
            cells.append(f"{math.log(b / a) / math.log(sizes[-1] / sizes[-2]):.2f}" if a and b else "n/a")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in reports:
        for stage, s in r["stages"].items():
            if s.get("note"):
                lines.append(f"- N = {r['num_images']:,}, {stage}: {s['note']}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--out", help="folder for the made-up data, the prepared files and scale.json")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--cache-images", type=int, default=32, help="TRAIN images the cache stage encodes")
    p.add_argument("--table", nargs="+", metavar="JSON", help="print the tables of earlier runs side by side")
    p.add_argument("--run-stage", choices=list(IN_PROCESS), help=argparse.SUPPRESS)  # the child's side
    args = p.parse_args()
    if args.table:
        print(table([json.load(open(path)) for path in args.table]))
        return
    if not args.out:
        p.error("--out is required")
    if args.run_stage:
        print(json.dumps(IN_PROCESS[args.run_stage](args)))
        return
    if args.num_images < 100:
        p.error("--num-images must be at least 100 (the splits need images)")
    os.makedirs(args.out, exist_ok=True)
    need = args.num_images * (30_000 + 3 * 256 * 256) + 2e9  # photos, prepared images, the rest
    free = shutil.disk_usage(args.out).free
    if need > free and not os.path.exists(os.path.join(args.out, "made.json")):
        sys.exit(f"error: {args.num_images} images need about {need / 1e9:.0f} GB in {args.out}, "
                 f"{free / 1e9:.0f} GB are free")
    t0 = time.perf_counter()
    make_data(args.out, args.num_images, args.width, args.height, args.workers)
    print(f"data: {args.num_images} images, {size_of(os.path.join(args.out, 'images')) / 1e9:.2f} GB of JPEGs "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    report_path = os.path.join(args.out, "scale.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {"stages": {}}
    report.update({"num_images": args.num_images, "photo_size": [args.width, args.height], "cpus": os.cpu_count(),
                   "date": time.strftime("%Y-%m-%d")})
    for stage in args.stages:
        result = RUNS[stage](args) if stage in RUNS else stage_in_process(stage, args)
        report["stages"][stage] = result
        print(f"{stage}: {result['seconds']:.1f} s, peak {result['peak_mib']:.0f} MiB; {result.get('note', '')}",
              flush=True)
        with open(report_path, "w") as f:
            json.dump(report, f, indent=1)
    print()
    print(table([report]))


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
