"""Compare two or more training runs side by side: quality, cost, training curves, attention.

    python compare.py runs/demo-rnn runs/demo-attention --out reports/demo

Reads each run's config.yaml, log.jsonl and eval results (eval_TEST.json and its per-image files,
from eval.py) and writes report.md with curves.png, metrics.png, attention.png and errors.png, and
report.html: the same report in one self-contained page, with a browser of every image of the split
(references, each run's caption and scores, filters, attention maps word by word). The first run is
the baseline: every metric of the others is also given as a margin over it. Everything in the summary
is computed from those numbers; nothing is decoded again (report.py holds the sections).
"""
import json
import os
from dataclasses import dataclass, field
from functools import cached_property

import yaml

import htmlpage
import report
from datasets import CaptionDataset, Vocabulary, load_references, load_word_map
from report import QUALITY
from results import read_results, read_table
from utils import ArgumentParser, InputError, atomic_path, run_cli

class Run:
    """What one run folder says about itself: given a folder, with its eval_{split}.json; given a
    results file in it (eval.py --out), with those results, named after the folder and the file."""

    def __init__(self, path, split):
        given = path.endswith(".json")  # a results file, not the folder's own eval_{split}.json
        folder = os.path.dirname(path) if given else path
        self.folder, self.name = folder, os.path.basename(os.path.normpath(folder))
        if given:
            stem = os.path.splitext(os.path.basename(path))[0]
            self.name += "-" + (stem[len(f"eval_{split}_"):] if stem.startswith(f"eval_{split}_") else stem)
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
        self.results_path = path if given else os.path.join(folder, f"eval_{split}.json")
        if given and not os.path.isfile(path):
            raise InputError(f"{path} not found: give a run folder, or a results file eval.py wrote in one")
        self.results = read_results(self.results_path)  # results.EvalResults, or None before eval.py ran
        self._tables = {}
        improved = [e for e in self.epochs if e["best"]]  # best.pt is the last epoch train.py marked best
        self.best = improved[-1] if improved else None
        bad = 0
        for e in self.epochs:
            bad = 0 if e["best"] else bad + 1
        patience = self.cfg["patience"]
        self.stopped_early = bool(patience and bad >= patience and len(self.epochs) < self.cfg["epochs"])

    @property
    def label(self):
        how = self.cfg["decoder"]
        if self.cfg.get("attention") == "hard":
            how = f"hard attention, {self.results.attention_inference if self.results else 'not evaluated'}"
        return f"{self.name} ({how})"

    @property
    def beams(self):
        return list(self.results.beams) if self.results else []

    def quality(self, beam):
        """Metrics at one beam size (None where not measured), plus validation loss / top-5 at the best epoch."""
        res = self.results.beams[beam].metrics if self.results and beam in self.results.beams else {}
        out = {k: res.get(k) for k in QUALITY}
        out["pointing_chance"] = res.get("pointing_chance")
        out["val_loss"] = self.best["val_loss"] if self.best else None
        out["val_top5"] = self.best["val_top5"] if self.best else None
        return out

    @cached_property
    def cost(self):
        median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
        return {
            "parameters": self.results.decoder_parameters if self.results else None,
            "train_images_per_s": median([e["images_per_s"] for e in self.epochs]),
            "epoch_time_s": median([e["epoch_time_s"] for e in self.epochs]),
            "train_time_s": sum(e["epoch_time_s"] for e in self.epochs),
            "peak_memory_mb": max((e["peak_memory_mb"] for e in self.epochs), default=None),
            "decoding": {k: b.images_per_s for k, b in self.results.beams.items()} if self.results else {},
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

    def table(self, beam):
        """eval.py's per-image results.ImageTable at one beam size, read once, or None."""
        if beam not in self._tables:
            beams = self.results.beams if self.results else {}
            self._tables[beam] = read_table(self.results_path, beams[beam]) if beam in beams else None
        return self._tables[beam]

    def captions(self, beam):
        """{image index in the split: caption} at one beam size ({} without a per-image file)."""
        table = self.table(beam)
        return {row.index: row.caption for row in table.rows} if table else {}


@dataclass
class Comparison:
    """The runs compared, the beam size of the figures, the errors and the browser, and the notes a
    reader must see (a run without that beam size, or without its attention maps)."""
    runs: list
    split: str
    beam: int
    beams: list  # the beam sizes every evaluated run has
    out: str
    command: str
    overlays: int = 4  # rows of attention.png
    thumb: int = 160
    browse_images: int = 0
    notes: list = field(default_factory=list)

    @classmethod
    def of(cls, runs, split, beam, out, command, **options):
        evaluated = [r for r in runs if r.results]
        beams = sorted(set.intersection(*(set(r.beams) for r in evaluated))) if evaluated else []
        c = cls(runs, split, beam, beams, out, command, **options)
        if evaluated and beam not in beams:
            c.beam = beams[0] if beams else beam
            lacking = ", ".join(r.name for r in evaluated if beam not in r.beams)
            c.notes.append(f"{lacking}: no beam {beam} results, so the figures, errors and browser use beam {c.beam} "
                           f"(evaluate with `--beam-size {beam}` for beam {beam})")
        for r in evaluated:
            table = r.table(c.beam)
            if r.cfg["decoder"] == "attention" and table is not None and not table.has_maps:
                c.notes.append(f"{r.name}: its beam-{c.beam} results have no attention maps (an older eval.py): "
                               f"run `python eval.py --checkpoint {os.path.join(r.folder, 'best.pt')} --beam-size "
                               f"{c.beam}` again for attention.png and the browser's maps")
        return c

    @property
    def evaluated(self):
        return [r for r in self.runs if r.results]

    @cached_property
    def data(self):
        """(the evaluated split's CaptionDataset, its raw references or None, its Vocabulary), from
        where eval.py read it, or None when it cannot be read any more."""
        res = self.evaluated[0].results
        try:
            dataset = CaptionDataset(res.data_folder, res.data_name, self.split)
            raw = load_references(res.data_folder, res.data_name, self.split, len(dataset))
            return dataset, raw, Vocabulary(load_word_map(res.data_folder, res.data_name))
        except InputError as e:
            self.notes.append(f"the evaluated data cannot be read ({e})")
            return None

    def picture(self, i):
        return self.data[0][i].image.numpy()

    def references(self, i):
        """Image i's references: the raw ones where prepared here, else the encoded ones."""
        dataset, raw, vocab = self.data
        return raw[i]["references"] if raw else [" ".join(vocab.decode(c)) for c in dataset.image_captions(i).tolist()]

    @cached_property
    def browser(self):
        """(report.html's browser data, None) or (None, why there is none)."""
        tables = [(r.name, r.label, r.table(self.beam)) for r in self.evaluated]
        missing = [name for name, _, t in tables if t is None]
        if missing or len(tables) < 2:
            return None, (f"{', '.join(missing)}: no per-image results at beam {self.beam}: evaluate again with "
                          "this version of eval.py" if missing else "fewer than two evaluated runs")
        if any([r.image_id for r in t.rows] != [r.image_id for r in tables[0][2].rows] for _, _, t in tables):
            return None, "the runs were evaluated on different images"
        if self.data is None:
            return None, "the evaluated data cannot be read"
        return htmlpage.browser_data(tables, self.picture, self.references, self.split, self.beam, self.thumb,
                                     self.browse_images), None


# The report, top to bottom: each section reads the Comparison and returns its Markdown lines.
SECTIONS = (report.header, report.summary, report.quality, report.cost, report.curves, report.metrics,
            report.self_critical, report.attention_maps, report.attention, report.errors, report.every_image)


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (or results files eval.py wrote in one, say "
                   "runs/NAME/eval_TEST_argmax.json); the first is the baseline")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--split", default="TEST", choices=["TEST", "VAL"])
    p.add_argument("--beam-size", type=int, default=3, help="beam of the figures, the errors and the browser")
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
    comparison = Comparison.of(runs, args.split, args.beam_size, args.out,
                               f"python compare.py {' '.join(args.runs)} --out {args.out}",
                               overlays=args.images, thumb=args.thumb_size, browse_images=args.browse_images)
    md = [line for section in SECTIONS for line in section(comparison)]
    for note in comparison.notes:
        print(f"note: {note}")
    text = "\n".join(md) + "\n"
    with atomic_path(os.path.join(args.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    with atomic_path(os.path.join(args.out, "report.html")) as tmp, open(tmp, "w") as f:
        f.write(htmlpage.page(md[0].lstrip("# "), comparison.browser[0], htmlpage.markdown(text, args.out)))
    print(f"report: {os.path.join(args.out, 'report.md')} and report.html")


if __name__ == "__main__":
    run_cli(main)
