"""Compare two or more training runs side by side: quality, cost, training curves, attention.

    python compare.py runs/demo-rnn runs/demo-attention --out reports/demo

Reads each run's config.yaml, log.jsonl and eval results (eval_TEST.json and its per-image files,
from eval.py) and writes report.md with curves.png, metrics.png, attention.png and errors.png, and
report.html: the same report in one self-contained page, with a browser of every image of the split
(references, each run's caption and scores, filters, attention maps word by word). The first run is
the baseline: every metric of the others is also given as a margin over it. Everything in the summary
is computed from those numbers.
"""
import json
import os
import platform
import time
from collections import Counter
from functools import cached_property

import matplotlib.pyplot as plt
import torch
import yaml
from tqdm import tqdm

import htmlpage
from datasets import CaptionDataset, Vocabulary, load_boxes, load_references, load_word_map
from metrics import describes_scene
from models import DecodeOptions, caption_images, load_model
from utils import ArgumentParser, InputError, atomic_path, load_checkpoint, run_cli
from visualize import attention_from_bytes, attention_grid, save

QUALITY = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "nltk BLEU-4", "pointing",
           "exact_match", "exact_match_1_objects", "exact_match_2_objects", "exact_match_3_objects",
           "phrase_precision", "relation_accuracy")
PERCENT = {"pointing", "exact_match", "exact_match_1_objects", "exact_match_2_objects", "exact_match_3_objects",
           "phrase_precision", "relation_accuracy", "val_top5"}


class Run:
    """What one run folder says about itself."""

    def __init__(self, folder, split):
        self.folder, self.name = folder, os.path.basename(os.path.normpath(folder))
        for needed in ("config.yaml", "log.jsonl"):
            if not os.path.isfile(os.path.join(folder, needed)):
                raise InputError(f"{folder} is not a run folder: {needed} is missing (train.py writes it)")
        with open(os.path.join(folder, "config.yaml")) as f:
            self.cfg = yaml.safe_load(f)
        with open(os.path.join(folder, "log.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        # not all-skipped windows; scst runs log the reward instead of the loss
        self.steps = [r for r in records if r["kind"] == "step" and ("loss" in r or "reward" in r)]
        self.epochs = [r for r in records if r["kind"] == "epoch"]
        self.eval, self._per_image = None, {}
        path = os.path.join(folder, f"eval_{split}.json")
        if os.path.isfile(path):
            with open(path) as f:
                self.eval = json.load(f)
        improved = [e for e in self.epochs if e["best"]]  # best.pt is the last epoch train.py marked best
        self.best = improved[-1] if improved else None
        patience = self.cfg["patience"]
        bad = 0
        for e in self.epochs:
            bad = 0 if e["best"] else bad + 1
        self.stopped_early = bool(patience and bad >= patience and len(self.epochs) < self.cfg["epochs"])

    @property
    def label(self):
        return f"{self.name} ({self.cfg['decoder']})"

    def beams(self):
        return sorted(int(k[4:]) for k in self.eval["results"]) if self.eval else []

    def quality(self, beam):
        """Metrics at one beam size (None where not measured), plus validation loss / top-5 at the best epoch."""
        res = (self.eval or {}).get("results", {}).get(f"beam{beam}", {})
        out = {k: res.get(k) for k in QUALITY}
        out["pointing_chance"] = res.get("pointing_chance")
        out["val_loss"] = self.best["val_loss"] if self.best else None
        out["val_top5"] = self.best["val_top5"] if self.best else None
        return out

    @cached_property
    def cost(self):
        ckpt = load_checkpoint(os.path.join(self.folder, "best.pt")) if self.has_checkpoint else None
        median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
        decoding = {}
        if self.eval:
            decoding = {k: v["images_per_s"] for k, v in self.eval["results"].items()}
        return {
            "parameters": sum(v.numel() for v in ckpt["decoder"].values()) if ckpt else None,
            "train_images_per_s": median([e["images_per_s"] for e in self.epochs]),
            "epoch_time_s": median([e["epoch_time_s"] for e in self.epochs]),
            "train_time_s": sum(e["epoch_time_s"] for e in self.epochs),
            "peak_memory_mb": max((e["peak_memory_mb"] for e in self.epochs), default=None),
            "decoding": decoding,
            "epochs": len(self.epochs),
            "best_epoch": self.best["epoch"] if self.best else None,
            "loss_noise": self.loss_noise(),
        }

    def loss_noise(self):
        """Standard deviation of the change of the logged training loss from one log line to the next,
        over the second half of training: how jagged the curve is (compare runs with the same log_every)."""
        losses = [s["loss"] for s in self.steps[len(self.steps) // 2:] if "loss" in s]  # scst logs rewards
        changes = [b - a for a, b in zip(losses, losses[1:], strict=False)]
        if len(changes) < 2:
            return None
        mean = sum(changes) / len(changes)
        return (sum((c - mean) ** 2 for c in changes) / (len(changes) - 1)) ** 0.5

    def per_image(self, beam):
        """eval.py's per-image file at one beam size, read once, or None (results from before it wrote
        them, or the file is gone)."""
        if beam not in self._per_image:
            res = (self.eval or {}).get("results", {}).get(f"beam{beam}", {})
            path = os.path.join(self.folder, res.get("images_file", ""))
            self._per_image[beam] = None
            if "images_file" in res and os.path.isfile(path):
                with open(path) as f:
                    self._per_image[beam] = json.load(f)
        return self._per_image[beam]

    @property
    def has_checkpoint(self):
        return os.path.isfile(os.path.join(self.folder, "best.pt"))


def label(key):
    """exact_match_2_objects -> "exact match, 2 objects"."""
    if key.startswith("exact_match_"):
        n = key.split("_")[2]
        return f"exact match, {n} object{'s' if n != '1' else ''}"
    return key.replace("_", " ")


def fmt(key, value):
    if value is None:
        return "n/a"
    if key in PERCENT:
        return f"{value:.1%}"
    if key == "parameters":
        return f"{value / 1e6:.2f} M"
    if key in ("train_images_per_s", "epoch_time_s", "train_time_s", "peak_memory_mb"):
        return f"{value:.1f}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def fmt_margin(key, value):
    if value is None:
        return "n/a"
    if key in PERCENT:
        return f"{value * 100:+.1f} pts"
    return f"{value:+.4f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def curves(runs, path):
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        if run.steps and "loss" in run.steps[0]:
            ax1.plot([s["step"] for s in run.steps], [s["loss"] for s in run.steps], label=run.label, lw=1)
        if run.epochs:
            ax2.plot([e["epoch"] for e in run.epochs], [e["val_loss"] for e in run.epochs], "o-", label=run.label)
            ax3.plot([e["epoch"] for e in run.epochs], [e["val_bleu4"] for e in run.epochs], "o-", label=run.label)
    label_axes(fig, path, ((ax1, "training loss", "loss (mean since the previous point)", "optimiser step"),
                           (ax2, "validation loss", "cross-entropy per word", "epoch"),
                           (ax3, "validation BLEU-4", "BLEU-4 (decoded)", "epoch")))


def label_axes(fig, path, axes):
    """Title, axis labels, grid and legend for each (ax, title, ylabel, xlabel); then save the figure."""
    for ax, title, ylabel, xlabel in axes:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path, dpi=100)


def bars(runs, beam, path):
    keys = [k for k in QUALITY if any(r.quality(beam)[k] is not None for r in runs)]
    fig, ax = plt.subplots(figsize=(max(8, len(keys) * 0.9), 4.5))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        q = run.quality(beam)
        values = [(q[k] or 0) / (10 if k == "CIDEr" else 1) for k in keys]
        ax.bar([x + i * width for x in range(len(keys))], values, width, label=run.label)
    ax.set_xticks([x + width * (len(runs) - 1) / 2 for x in range(len(keys))])
    ax.set_xticklabels([label(k).replace("CIDEr", "CIDEr / 10") for k in keys], rotation=35, ha="right", fontsize=8)
    ax.set_ylabel("score (fractions; CIDEr divided by 10)")
    ax.set_title(f"TEST metrics at beam {beam}")
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=8, loc="upper left", ncol=len(runs))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, path, dpi=100)


RELATIONS = ("left of", "right of", "above", "below")


def scst_pairs(runs):
    """(xe run, scst run) for each scst run whose --init_from lies in another compared run's folder."""
    by_folder = {os.path.realpath(r.folder): r for r in runs}
    pairs = []
    for run in runs:
        if run.cfg.get("objective") == "scst" and run.cfg.get("init_from"):
            base = by_folder.get(os.path.realpath(os.path.dirname(run.cfg["init_from"])))
            if base is not None and base.eval and run.eval:
                pairs.append((base, run))
    return pairs


def caption_stats(run, beam):
    """Mean caption length in words, distinct words used, relation statements, and the openings
    (first three words) of the captions at one beam size."""
    captions = list(captions_of(run, beam).values())
    words = [c.split() for c in captions]
    return {"caption length": sum(map(len, words)) / len(words),
            "vocabulary used": len({w for ws in words for w in ws}),
            "relation statements": sum(c.count(r) for c in captions for r in RELATIONS),
            "openings": Counter(" ".join(ws[:3]) for ws in words)}


def scst_section(runs, beams, out):
    """What self-critical training changed, per decoder: every measure before and after, the caption
    templates, where CIDEr rose while a measure of truth fell, and whether attention's lead held."""
    pairs = scst_pairs(runs)
    if not pairs:
        return []
    md = ["## What self-critical training changed", "",
          "Each SCST run against the cross-entropy checkpoint it started from (`--init_from`), on "
          f"{runs[0].eval['split'] if runs[0].eval else 'TEST'}.", ""]
    extra = ("caption length", "vocabulary used", "relation statements")
    stats = {(r.name, b): caption_stats(r, b) for pair in pairs for r in pair for b in beams}  # reads each file once
    for b in beams:
        keys = [k for k in QUALITY if any(r.quality(b)[k] is not None for pair in pairs for r in pair)]
        header = ["measure"] + [f"{x.name} -> {y.name}" for x, y in pairs]
        rows = []
        for k in keys + list(extra) + ["train time (s)"]:
            row = [label(k)]
            for base, run in pairs:
                if k in extra:
                    v0, v1 = stats[base.name, b][k], stats[run.name, b][k]
                    row.append(f"{v0:.4g} -> {v1:.4g} ({v1 - v0:+.4g})")
                elif k == "train time (s)":
                    row.append(f"{run.cost['train_time_s']:.0f} (xe: {base.cost['train_time_s']:.0f})")
                else:
                    v0, v1 = base.quality(b)[k], run.quality(b)[k]
                    row.append("n/a" if v0 is None or v1 is None else
                               f"{fmt(k, v0)} -> {fmt(k, v1)} ({fmt_margin(k, v1 - v0)})")
            rows.append(row)
        md += [f"### beam {b}", "", table(header, rows), ""]
    beam = max(beams)
    md += [f"### Caption openings at beam {beam}", "", "The first three words of each caption: the template mix.", ""]
    for base, run in pairs:
        o0, o1 = stats[base.name, beam]["openings"], stats[run.name, beam]["openings"]
        n0, n1 = sum(o0.values()), sum(o1.values())
        top = [w for w, _ in (o0 + o1).most_common(6)]
        md += [table([f"opening ({run.cfg['decoder']})", base.name, run.name],
                     [[f"\"{w} ...\"", f"{o0[w] / n0:.1%}", f"{o1[w] / n1:.1%}"] for w in top]), ""]
    md += ["### In plain words", ""]
    truth = ("exact_match", "exact_match_2_objects", "exact_match_3_objects", "relation_accuracy", "phrase_precision",
             "pointing")
    for base, run in pairs:
        for b in beams:
            q0, q1 = base.quality(b), run.quality(b)
            s0, s1 = stats[base.name, b], stats[run.name, b]
            fell = [label(k) for k in truth if q0.get(k) is not None and q1.get(k) is not None and q1[k] < q0[k] - 1e-9]
            line = (f"- **{run.cfg['decoder']}, beam {b}**: CIDEr {q0['CIDEr']:.3f} -> {q1['CIDEr']:.3f}; captions "
                    f"{s0['caption length']:.1f} -> {s1['caption length']:.1f} words, {s0['relation statements']} -> "
                    f"{s1['relation statements']} relation statements, vocabulary {s0['vocabulary used']} -> "
                    f"{s1['vocabulary used']} words. ")
            if q1["CIDEr"] > q0["CIDEr"] and fell:
                line += f"CIDEr rose while {', '.join(fell)} fell: there the reward was gamed."
            elif fell:
                line += f"{', '.join(fell)} fell."
            else:
                line += "No measure of truth fell."
            o0, o1 = s0["openings"], s1["openings"]
            shift = max(o0 + o1, key=lambda w: abs(o1[w] / sum(o1.values()) - o0[w] / sum(o0.values())))
            line += (f" The template that moved most: \"{shift} ...\", {o0[shift] / sum(o0.values()):.0%} -> "
                     f"{o1[shift] / sum(o1.values()):.0%} of captions.")
            md.append(line)
    by_decoder = {run.cfg["decoder"]: (base, run) for base, run in pairs}
    if {"rnn", "attention"} <= set(by_decoder):
        (rx, rs), (ax, as_) = by_decoder["rnn"], by_decoder["attention"]
        for b in beams:
            for k in ("CIDEr", "exact_match"):
                before = ax.quality(b)[k] - rx.quality(b)[k]
                after = as_.quality(b)[k] - rs.quality(b)[k]
                md.append(f"- Attention's lead in {label(k)} at beam {b}: {fmt_margin(k, before)} after cross-entropy, "
                          f"{fmt_margin(k, after)} after SCST: it {'grew' if after > before else 'shrank'}.")
    md.append("")
    scst_curves([r for _, r in pairs], os.path.join(out, "scst_curves.png"))
    return md + ["![reward, sample length and validation CIDEr-D over training](scst_curves.png)", ""]


def scst_curves(runs, path):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for run in runs:
        t = [s["step"] for s in run.steps]
        axes[0].plot(t, [s["reward"] for s in run.steps], label=run.label, lw=1)
        axes[1].plot(t, [s["sample_length"] for s in run.steps], label=run.label, lw=1)
        elapsed = [sum(e["epoch_time_s"] for e in run.epochs[: i + 1]) for i in range(len(run.epochs))]
        axes[2].plot(elapsed, [e["val_cider"] for e in run.epochs], "o-", label=run.label)
    label_axes(fig, path, ((axes[0], "mean reward of the samples", "CIDEr-D", "optimiser step"),
                           (axes[1], "sample length", "words", "optimiser step"),
                           (axes[2], "validation CIDEr-D (greedy)", "CIDEr-D", "training time (s)")))


def captions_of(run, beam):
    """{image index in the split: caption}; eval.py writes the captions in the split's order."""
    res = run.eval["results"][f"beam{beam}"]
    with open(os.path.join(run.folder, res["captions_file"])) as f:
        return {i: c["caption"] for i, c in enumerate(json.load(f))}


def browser_data(runs, beam, split, thumb, limit=0):
    """report.html's browser: every image of the split with its references and each run's caption at
    `beam` and per-image scores (eval.py's per-image files; nothing is decoded again). Returns (data,
    None), or (None, why not)."""
    tables = {r.name: r.per_image(beam) for r in runs if r.eval}
    missing = [n for n, t in tables.items() if t is None]
    if missing or len(tables) < 2:
        return None, (f"{', '.join(missing)}: no per-image results at beam {beam}: evaluate again with this "
                      "version of eval.py" if missing else "fewer than two evaluated runs")
    shown = [r for r in runs if r.name in tables]
    ids = [[row["image_id"] for row in tables[r.name]["images"]] for r in shown]
    if any(i != ids[0] for i in ids):
        return None, "the runs were evaluated on different images"
    ev = shown[0].eval
    try:  # the pictures and references come from the prepared data
        dataset = CaptionDataset(ev["data_folder"], ev["data_name"], split)
        raw = load_references(ev["data_folder"], ev["data_name"], split, len(dataset))
        vocab = None if raw else Vocabulary(load_word_map(ev["data_folder"], ev["data_name"]))
    except InputError as e:
        return None, f"the evaluated data cannot be read ({e})"
    images = []
    rows = [tables[r.name]["images"][:limit or None] for r in shown]
    for k, row in enumerate(tqdm(rows[0], desc="images for the browser", unit="image", leave=False)):
        i = row["index"]
        refs = raw[i]["references"] if raw else [" ".join(vocab.decode(c)) for c in dataset.image_captions(i).tolist()]
        caps = []
        for r in rows:
            cap = dict(r[k])
            cap["right"] = cap.get("describes_scene", cap["exact_match"])
            for key in ("index", "image_id"):
                cap.pop(key)
            caps.append(cap)
        images.append({"src": htmlpage.image_uri(dataset[i].image.numpy(), thumb),
                       "title": f"{split} {i}" + (f" ({row['image_id']})" if row["image_id"] != i else ""),
                       "refs": refs, "caps": caps})
    scene, pointing = "describes_scene" in rows[0][0], any("pointing" in r[0] for r in rows)
    help_text = [f"Captions at beam {beam}; each with its own CIDEr against the image's references."]
    if any(t["attention_grid"] for t in tables.values()):
        help_text.append("Hover over a word of the attention decoder, or click one and step with the arrow keys (up "
                         "and down: the next image), to see its attention map over the image, smoothed as "
                         "caption.py draws it.")
    help_text.append("Wrong means false of the scene: an object missed or invented, or a false relation." if scene
                     else "Wrong means matching none of the references word for word.")
    if pointing:
        help_text.append("A wavy underline marks a colour or shape word whose most attended cell lies on no such "
                         "object.")
    return {"runs": [{"name": r.name, "label": r.label, "grid": tables[r.name]["attention_grid"]} for r in shown],
            "split": split, "scored": True, "images": images, "help": " ".join(help_text)}, None


def summary(runs, beam):
    """Sentences computed from the numbers: who wins what, by how much."""
    base, lines = runs[0], []
    qb = base.quality(beam)
    for run in runs[1:]:
        q = run.quality(beam)
        won = [k for k in QUALITY if q[k] is not None and qb[k] is not None and q[k] > qb[k]]
        lost = [k for k in QUALITY if q[k] is not None and qb[k] is not None and q[k] < qb[k]]
        compared = len(won) + len(lost) + sum(q[k] == qb[k] for k in QUALITY if q[k] is not None and qb[k] is not None)
        trails = f" and trails on {len(lost)} ({', '.join(map(label, lost))})" if lost else ""
        lines.append(f"- **{run.label}** beats **{base.label}** on {len(won)} of {compared} quality measures at "
                     f"beam {beam}{trails}.")
        gaps = sorted(((q[k] - qb[k], k) for k in won), key=lambda g: -abs(g[0]) / (10 if g[1] == "CIDEr" else 1))
        if gaps:
            lines.append("  Largest gains: " + ", ".join(f"{label(k)} {fmt_margin(k, d)}" for d, k in gaps[:4]) + ".")
        cb, c = base.cost, run.cost
        if cb["train_images_per_s"] and c["train_images_per_s"]:
            ratio = cb["train_images_per_s"] / c["train_images_per_s"]
            pace = f"{ratio:.2f}x slower" if ratio > 1 else f"{1 / ratio:.2f}x faster"
            lines.append(f"  It trains {pace} "
                         f"({c['train_images_per_s']:.0f} vs {cb['train_images_per_s']:.0f} images/s)"
                         + (f" with {c['parameters'] / cb['parameters']:.2f}x the decoder parameters"
                            if c["parameters"] and cb["parameters"] else "") + ".")
        key = f"beam{beam}"
        if key in c["decoding"] and key in cb["decoding"]:
            lines.append(f"  Decoding at beam {beam}: {c['decoding'][key]:.0f} vs {cb['decoding'][key]:.0f} images/s.")
        if q["pointing"] is not None:
            lines.append(f"  Its attention points at the named object for {q['pointing']:.1%} of colour and shape "
                         f"words, {q['pointing'] / q['pointing_chance']:.1f}x the chance level "
                         f"({q['pointing_chance']:.1%}).")
    return lines


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders; the first is the baseline")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--split", default="TEST", choices=["TEST", "VAL"])
    p.add_argument("--beam-size", type=int, default=3, help="beam used for overlays and errors")
    p.add_argument("--images", type=int, default=4, help="rows of attention overlays")
    p.add_argument("--thumb-size", type=int, default=160,
                   help="largest side of the browser's pictures in pixels (smaller images stay as they are)")
    p.add_argument("--browse-images", type=int, default=0, metavar="N",
                   help="the browser shows the first N images of the split (0: all; COCO's 5000 make a page of "
                        "about 70 MB at the default --thumb-size)")
    args = p.parse_args()
    if len(args.runs) < 2:
        p.error("give at least two run folders")
    if args.thumb_size < 16 or args.browse_images < 0:
        p.error("--thumb-size must be at least 16 and --browse-images at least 0")
    runs = [Run(folder, args.split) for folder in args.runs]
    os.makedirs(args.out, exist_ok=True)
    evaluated = [r for r in runs if r.eval]
    beams = sorted(set.intersection(*(set(r.beams()) for r in evaluated))) if evaluated else []
    beam = args.beam_size if args.beam_size in beams else (beams[0] if beams else args.beam_size)

    md = [f"# Comparison: {' vs '.join(r.label for r in runs)}", "",
          f"Generated by `python compare.py {' '.join(args.runs)} --out {args.out}` on {time.strftime('%Y-%m-%d')}, "
          f"{platform.machine()} {platform.system()}, torch {torch.__version__}. Baseline: {runs[0].label}; "
          f"split {args.split}.", ""]
    for run in runs:
        if not run.eval:
            md.append(f"- **{run.label}: no eval results yet** - run `python eval.py --checkpoint "
                      f"{os.path.join(run.folder, 'best.pt')} --split {args.split}`, then compare again.")
        if run.stopped_early:
            md.append(f"- {run.label} stopped early after {len(run.epochs)} of {run.cfg['epochs']} epochs "
                      f"(patience {run.cfg['patience']}); its best epoch was {run.best['epoch']}.")
    md += ["", "## Summary", ""] + (summary([runs[0]] + [r for r in runs[1:] if r.eval], beam)
                                    if runs[0].eval and len(evaluated) > 1 else ["Not enough eval results."])

    md += ["", "## Quality", ""]
    used = {(r.eval or {}).get("references", {}).get("kind", "encoded") for r in runs if r.eval}
    if used:  # eval.py says which references coco-caption scored against (older results: the encoded ones)
        md += [f"coco-caption metrics against the {' and '.join(sorted(used))} references; nltk BLEU-4 against "
               "the encoded references (the tutorial's protocol).", ""]
    for b in beams:
        keys = [k for k in QUALITY if any(r.quality(b)[k] is not None for r in runs)] + ["val_loss", "val_top5"]
        rows = []
        for run in runs:
            q = run.quality(b)
            rows.append([run.label] + [fmt(k, q[k]) + (f" (chance {q['pointing_chance']:.1%})"
                                                         if k == "pointing" and q[k] is not None else "")
                                       for k in keys])
        for run in runs[1:]:
            q, qb = run.quality(b), runs[0].quality(b)
            rows.append([f"margin {run.name} - {runs[0].name}"] +
                        [fmt_margin(k, q[k] - qb[k] if q[k] is not None and qb[k] is not None else None)
                         for k in keys])
        md += [f"### beam {b}", "", table(["run"] + [label(k) for k in keys], rows), ""]
    md += ["val loss and val top-5 are teacher-forced, at the best epoch. exact match: the caption equals one of the "
           "references; phrase precision: share of \"size colour shape\" phrases that name a real object; relation "
           "accuracy: share of \"X left of / right of / above / below Y\" statements true of the boxes; pointing: "
           "share of colour and shape words whose most attended cell lies on such an object.", ""]

    md += ["## Cost", ""]
    rows = []
    for run in runs:
        c = run.cost
        decoding = ", ".join(f"{k[4:]}: {v:.0f}" for k, v in sorted(c["decoding"].items())) or "n/a"
        stop = f"{c['epochs']} (best {c['best_epoch']}{', stopped early' if run.stopped_early else ''})"
        noise = "n/a" if c["loss_noise"] is None else f"{c['loss_noise']:.4f} (every {run.cfg['log_every']})"
        keys = ("parameters", "train_images_per_s", "epoch_time_s", "train_time_s", "peak_memory_mb")
        rows.append([run.label] + [fmt(k, c[k]) for k in keys] + [decoding, stop, noise])
    md += [table(["run", "decoder parameters", "train images/s", "epoch time (s)", "train time (s)",
                  "peak memory (MiB)", "decoding images/s by beam", "epochs", "loss noise (log lines)"], rows), "",
           "Training images/s and epoch time are medians over epochs; peak memory is the process's (CPU) or "
           "CUDA's maximum allocation. Loss noise: standard deviation of the change in training loss from one log "
           "line to the next over the second half of training (lower: a smoother curve).", ""]

    curves(runs, os.path.join(args.out, "curves.png"))
    md += ["## Training curves", "", "![training and validation curves](curves.png)", ""]
    if beams:
        bars(runs, beam, os.path.join(args.out, "metrics.png"))
        md += [f"## Metrics at beam {beam}", "", "![metrics](metrics.png)", ""]

    md += scst_section(runs, beams, args.out)
    attention = [r for r in runs if r.cfg["decoder"] == "attention" and r.has_checkpoint]
    if attention and evaluated:
        md += interpretability(runs, attention[0], evaluated, beam, args)
    data, why_not = (browser_data(runs, beam, args.split, args.thumb_size, args.browse_images) if beams
                     else (None, "no eval results"))
    which = (f"the first {len(data['images'])} {args.split} images" if data and args.browse_images
             else f"every {args.split} image")
    md += ["## Every image", "", f"[report.html](report.html#browse) has this report and a browser of {which}: "
           "references, each run's caption and its CIDEr, filters, attention maps word by "
           "word." if data else
           f"No browser of the {args.split} images in report.html: {why_not}.", ""]
    text = "\n".join(md) + "\n"
    with atomic_path(os.path.join(args.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    title = md[0].lstrip("# ")
    report = htmlpage.markdown(text, args.out)
    with atomic_path(os.path.join(args.out, "report.html")) as tmp, open(tmp, "w") as f:
        f.write(htmlpage.page(title, data, report))
    print(f"report: {os.path.join(args.out, 'report.md')} and report.html")


def interpretability(runs, att, evaluated, beam, args):
    """attention.png: where the attention run looked for each word, with the other runs' captions for
    the same images; errors.png and a list: TEST images on which the runs disagree."""
    ckpt = load_checkpoint(os.path.join(att.folder, "best.pt"))
    encoder, decoder = load_model(ckpt, torch.device("cpu"))
    dataset = CaptionDataset(att.cfg["data_folder"], att.cfg["data_name"], args.split)
    vocab = Vocabulary(ckpt["word_map"])
    captions = {r.name: captions_of(r, beam) for r in evaluated if f"beam{beam}" in r.eval["results"]}
    ids = list(range(min(args.images, len(dataset))))
    images = torch.stack([dataset[i].image for i in ids])
    stored = att.per_image(beam)
    if stored and stored["attention_grid"] and len(stored["images"]) >= len(ids):  # eval.py --attention-maps
        rows = [(images[j].numpy(), f"TEST {i}", stored["images"][i]["caption"].split(),
                 attention_from_bytes(stored["images"][i]["attention"], stored["attention_grid"]))
                for j, i in enumerate(ids)]
    else:
        out = caption_images(encoder, decoder, vocab, images, DecodeOptions(beam, att.cfg["max_decode_len"]))
        rows = [(images[j].numpy(), f"TEST {i}", c.words, c.alphas)
                for j, (i, c) in enumerate(zip(ids, out, strict=True))]
    attention_grid(rows, os.path.join(args.out, "attention.png"))
    md = ["## Where the attention decoder looks", "",
          f"One row per TEST image: the image, then {att.label}'s attention for each word it generated "
          f"(beam {beam}); light means attended.", "", "![attention overlays](attention.png)", ""]
    md += [table(["image"] + list(captions), [[f"TEST {i}"] + [c.get(i, "n/a") for c in captions.values()]
                                              for i in ids]), ""]

    # Errors: images on which the runs say different things and at least one is wrong: false of the scene
    # where the data has boxes (shapes), else matching none of the references.
    names = list(captions)
    refs = {i: [" ".join(vocab.decode(c)) for c in dataset.image_captions(i).tolist()]
            for i in sorted(captions[names[0]])}
    boxes = load_boxes(att.cfg["data_folder"], att.cfg["data_name"], args.split)
    if boxes is not None:
        right = lambda i, c: c is not None and describes_scene(c.split(), boxes[i])  # noqa: E731
        rule = "false of the scene (an object missed or invented, or a wrong relation)"
    else:
        right = lambda i, c: c in refs[i]  # noqa: E731
        rule = "matching no reference"
    disagree = [i for i in refs if len({captions[n].get(i) for n in names}) > 1
                and not all(right(i, captions[n].get(i)) for n in names)][:5]
    if disagree:
        fig, axes = plt.subplots(1, len(disagree), figsize=(3.2 * len(disagree), 3.6), squeeze=False)
        for ax, i in zip(axes[0], disagree, strict=True):
            ax.imshow(dataset[i].image.numpy().transpose(1, 2, 0))
            ax.set_title(f"TEST {i}", fontsize=9)
            ax.axis("off")
        fig.tight_layout()
        save(fig, os.path.join(args.out, "errors.png"), dpi=100)
        md += ["## Typical errors", "", f"The first {len(disagree)} TEST images on which the runs' captions differ "
               f"and one is wrong (beam {beam}); captions in *italics* are {rule}.", "",
               "![images where the decoders disagree](errors.png)", "",
               table(["image", "a reference"] + names,
                     [[f"TEST {i}", refs[i][0]] + [c if right(i, c) else f"*{c}*"
                                                    for c in (captions[n].get(i) for n in names)]
                      for i in disagree]), ""]
    return md


if __name__ == "__main__":
    run_cli(main)
