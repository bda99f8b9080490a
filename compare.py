"""Compare training runs, or groups of runs at several seeds, side by side: quality with an interval
on every margin, cost, training curves, attention.

    python compare.py runs/demo-rnn runs/demo-attention --out runs/reports/demo
    python compare.py --group rnn runs/demo-rnn runs/seeds-rnn-s1 runs/seeds-rnn-s2 \
        --group attention runs/demo-attention runs/seeds-attention-s1 runs/seeds-attention-s2 --out runs/reports/seeds

Reads each run's config.yaml, log.jsonl and eval results (eval_TEST.json and its per-image files,
from eval.py) and writes report.md with curves.png, metrics.png, attention.png and errors.png,
report.html (the same report in one self-contained page, with a browser of every image of the split:
references, each group's first run's caption and scores, filters, attention maps word by word) and
comparison.json (every value and every margin, results.comparison_json). A plain run is a group of
one. Each pair of groups (--pair, or every pair) gets a margin per measure with a 95% interval and a
p-value (significance.py: a paired bootstrap over the test images, and across seeds where a group has
several). Everything in the summary is computed from those numbers; nothing is decoded again (report.py
holds the sections).
"""
import json
import os
import statistics
from dataclasses import asdict, dataclass, field
from functools import cached_property

import yaml

import htmlpage
import report
import significance
from config import RUN_KEYS, default_config
from datasets import CaptionDataset, Vocabulary, load_references, load_word_map
from models import decoder_class
from report import CHANCE, QUALITY, UNRESAMPLED
from results import Interval, Margin, comparison_json, mean_sd, read_results, read_table
from utils import ArgumentParser, InputError, atomic_path, run_cli, write_json


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
            self.cfg = {**default_config(), **yaml.safe_load(f)}  # defaults for keys an older train.py lacked
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

    def eval_command(self, split, beam=None):
        """The eval.py command that writes (or rewrites) this run's results: every hint says this one."""
        return (f"`python eval.py --checkpoint {os.path.join(self.folder, 'best.pt')}"
                + (f" --beam-size {beam}" if beam else "") + (f" --split {split}" if split != "TEST" else "") + "`")

    @property
    def how(self):
        """The decoder, and for hard attention the inference it was scored with."""
        if self.cfg.get("attention") == "hard":
            return f"hard attention, {self.results.attention_inference if self.results else 'not evaluated'}"
        return self.cfg["decoder"]

    @property
    def label(self):
        return f"{self.name} ({self.how})"

    @property
    def maps(self):
        """Whether its decoder attends over the grid (its results can draw maps)."""
        return decoder_class(self.cfg["decoder"]).returns_maps

    @property
    def beams(self):
        return list(self.results.beams) if self.results else []

    def quality(self, beam):
        """Metrics at one beam size (None where not measured), plus validation loss / top-5 at the best epoch."""
        res = self.results.beams[beam].metrics if self.results and beam in self.results.beams else {}
        out = {k: res.get(k) for k in QUALITY}
        out.update({f"{k}_chance": res.get(f"{k}_chance") for k in CHANCE})
        out["val_loss"] = self.best["val_loss"] if self.best else None
        out["val_top5"] = self.best["val_top5"] if self.best else None
        return out

    @cached_property
    def cost(self):
        median = lambda xs: statistics.median_high(xs) if xs else None  # noqa: E731
        return {
            "parameters": self.results.decoder_parameters if self.results else None,
            "train_images_per_s": median([e["images_per_s"] for e in self.epochs]),
            "epoch_time_s": median([e["epoch_time_s"] for e in self.epochs]),
            "train_time_s": sum(e["epoch_time_s"] for e in self.epochs),
            "peak_memory_mb": max((e["peak_memory_mb"] for e in self.epochs), default=None),
            "decoding": {k: b.images_per_s for k, b in self.results.beams.items()} if self.results else {},
            # other processes' CPU use (cores) while decoding, and at most over the epochs (hardware.OtherLoad)
            "decoding_others": {k: b.others_cores for k, b in self.results.beams.items()} if self.results else {},
            "train_others": max((e.get("others_cores") or 0.0 for e in self.epochs), default=None),
            "epochs": len(self.epochs),
            "best_epoch": self.best["epoch"] if self.best else None,
            "loss_noise": self.loss_noise(),
        }

    def loss_noise(self):
        """Standard deviation of the change of the logged training loss from one log line to the next,
        over the second half of training: how jagged the curve is (compare runs with the same log_every)."""
        losses = [s["loss"] for s in self.steps[len(self.steps) // 2:] if "loss" in s]  # scst logs rewards
        changes = [b - a for a, b in zip(losses, losses[1:], strict=False)]
        return statistics.stdev(changes) if len(changes) > 1 else None

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
class Group:
    """Runs of one configuration that differ only in their seed (check_group), or one run alone."""
    name: str
    runs: list

    @property
    def first(self):
        return self.runs[0]

    @property
    def label(self):
        """The group's name (a plain run's is its folder's) throughout the report, with what it is."""
        if len(self.runs) == 1:
            return f"{self.name} ({self.first.how})"
        return f"{self.name} ({self.first.how}, {len(self.runs)} seeds)"

    def values(self, beam, key):
        """Each run's value of one quality measure at one beam size; None when any run lacks it."""
        values = [r.quality(beam)[key] for r in self.runs]
        return None if any(v is None for v in values) else values


def experiment(run):
    """What defines a run's experiment: its config (with defaults for keys an older train.py did not
    write) without config.RUN_KEYS, and what eval.py scored (data, split, images, attention inference)."""
    out = {k: v for k, v in run.cfg.items() if k not in RUN_KEYS}
    if run.results:
        r = run.results
        out.update({**r.scored_on, "attention inference": r.attention_inference})
    return out


def decoding(run, beam):
    """The decoding options eval.py used at one beam size."""
    scored = run.results.beams[beam]
    return {k: getattr(scored, k) for k in ("max_len", "length_penalty", "block_ngram_repeat")}


# The differences that say most about why runs are not seeds of one experiment, named first.
TELLING = ("decoder", "attention", "objective", "data_name", "evaluated data", "split", "images", "attention inference")


def check_group(group, split):
    """Refuse, in one line naming the difference, a group whose runs are not seeds of one experiment."""
    first, key = group.first, experiment(group.first)
    unevaluated = [r for r in group.runs if not r.results]
    if unevaluated and len(unevaluated) < len(group.runs):
        run = unevaluated[0]
        raise InputError(f"group {group.name}: {run.folder} has no eval_{split}.json yet: run "
                         f"{run.eval_command(split).strip('`')} on it first")
    seeds = {}
    for run in group.runs:
        other = experiment(run)
        differ = sorted((k for k in set(key) | set(other) if key.get(k) != other.get(k)),
                        key=lambda k: (TELLING.index(k) if k in TELLING else len(TELLING), str(k)))
        if differ:
            k = differ[0]
            raise InputError(f"group {group.name}: {first.folder} and {run.folder} differ in {k} ({key.get(k)!r} "
                             f"against {other.get(k)!r}): a group holds runs that differ only in "
                             f"{', '.join(RUN_KEYS)}")
        for beam in sorted(set(first.beams) & set(run.beams)):
            ours, theirs = decoding(first, beam), decoding(run, beam)
            if ours != theirs:
                raise InputError(f"group {group.name}: {first.folder} and {run.folder} were decoded with other options "
                                 f"at beam {beam} ({ours} against {theirs}): evaluate them alike")
        if run.cfg["seed"] in seeds:
            raise InputError(f"group {group.name}: {seeds[run.cfg['seed']].folder} and {run.folder} both have seed "
                             f"{run.cfg['seed']}: a group's runs are different seeds of one configuration")
        seeds[run.cfg["seed"]] = run


def check_same_images(runs):
    """Refuse, before anything is written, runs whose eval results score different images: their
    margins would compare two datasets."""
    evaluated = [r for r in runs if r.results]
    def what(run):
        scored = run.results.scored_on
        return f"{scored['evaluated data']}, split {scored['split']}, {scored['images']} images"

    for run in evaluated[1:]:
        if what(run) != what(evaluated[0]):
            raise InputError(f"{evaluated[0].name} was scored on {what(evaluated[0])} and {run.name} on {what(run)}: "
                             "compare runs scored on the same split of the same data")


@dataclass
class Comparison:
    """The groups compared (each one run, or the seeds of one configuration), the pairs whose margins
    the report gives, the beam size of the figures, and the notes a reader must see (a run without that
    beam size, without its attention maps or without per-image statistics)."""
    groups: list
    pairs: list  # (group a, group b): margins b - a
    split: str
    beam: int
    beams: list  # the beam sizes every evaluated run has
    out: str
    command: str
    overlays: int = 4  # rows of attention.png
    thumb: int = 160
    browse_images: int = 0
    resamples: int = significance.RESAMPLES
    bootstrap_seed: int = significance.SEED
    notes: list = field(default_factory=list)
    _draws: dict = field(default_factory=dict, init=False, repr=False)  # (run, beam) -> its resampled metrics
    _margins: dict = field(default_factory=dict, init=False, repr=False)  # (runs a, runs b, beam) -> margins

    @classmethod
    def of(cls, groups, pairs, split, beam, out, command, **options):
        runs = [r for g in groups for r in g.runs]
        check_same_images(runs)
        evaluated = [r for r in runs if r.results]
        beams = sorted(set.intersection(*(set(r.beams) for r in evaluated))) if evaluated else []
        c = cls(groups, pairs, split, beam, beams, out, command, **options)
        if evaluated and beam not in beams:
            c.beam = beams[0] if beams else beam
            lacking = ", ".join(r.name for r in evaluated if beam not in r.beams)
            c.notes.append(f"{lacking}: no beam {beam} results, so the figures, errors and browser use beam {c.beam} "
                           f"(evaluate with `--beam-size {beam}` for beam {beam})")
        for r in evaluated:
            table = r.table(c.beam)
            again = r.eval_command(split, c.beam)
            if table is not None and not table.has_statistics:
                c.notes.append(f"{r.name}: its beam-{c.beam} results have no per-image statistics (an older eval.py), "
                               f"so its margins have no interval: evaluate again with {again}")
            if r.maps and table is not None and not table.has_maps:
                c.notes.append(f"{r.name}: its beam-{c.beam} results have no attention maps (an older eval.py): "
                               f"evaluate again with {again} for attention.png and the browser's maps")
        return c

    @property
    def runs(self):
        return [r for g in self.groups for r in g.runs]

    @property
    def evaluated(self):
        return [r for r in self.runs if r.results]

    @property
    def shown(self):
        """The evaluated run shown for each group in the per-image sections (its first)."""
        return [g.first for g in self.groups if g.first.results]

    @cached_property
    def counts(self):
        """The bootstrap's resample counts (resamples x images), one matrix for every run: paired."""
        return significance.resample_counts(self.evaluated[0].results.images, self.resamples, self.bootstrap_seed)

    def draws(self, run, beam):
        """{measure: (value on all images, values on the resamples)} of one run at one beam size."""
        if (run.results_path, beam) not in self._draws:
            table = run.table(beam)
            names = [k for k in QUALITY if run.quality(beam)[k] is not None]
            self._draws[run.results_path, beam] = significance.replicates(table.rows, names, self.counts) \
                if table is not None and table.has_statistics else {}
        return self._draws[run.results_path, beam]

    def margins(self, a, b, beam):
        """results.Margin of group b over group a for every quality measure both have at one beam size
        (with its interval where every run has per-image statistics), then validation loss and top-5
        (never an interval). Holm's adjustment runs over the measures with an interval."""
        cached = (tuple(r.results_path for r in a.runs), tuple(r.results_path for r in b.runs), beam)
        if cached in self._margins:
            return self._margins[cached]
        out = []
        for key in QUALITY + UNRESAMPLED:
            values_a, values_b = a.values(beam, key), b.values(beam, key)
            if values_a is None or values_b is None:
                continue
            draws = [[self.draws(r, beam).get(key) for r in g.runs] for g in (a, b)]
            if key in QUALITY and all(d is not None for side in draws for d in side):
                interval = significance.margin(values_a, values_b, *draws)
            else:
                interval = Interval(mean_sd(values_b)[0] - mean_sd(values_a)[0])
            out.append(Margin(**asdict(interval), a=a.name, b=b.name, beam=beam, measure=key))
        tested = [m for m in out if m.p is not None]
        for m, adjusted in zip(tested, significance.holm([m.p for m in tested]), strict=True):
            m.p_holm = adjusted
        self._margins[cached] = out
        return out

    def run_margins(self, a, b, beam):
        """margins() of run b over run a, each taken alone."""
        return self.margins(Group(a.name, [a]), Group(b.name, [b]), beam)

    @cached_property
    def all_margins(self):
        """Every pair's margins at every beam size every run has."""
        return [m for b in self.beams for a, g in self.pairs for m in self.margins(a, g, b)]

    def methods(self):
        """{method: its sentence} for the interval methods the margins used."""
        used = {m.method for m in self.all_margins if m.method}
        images = self.evaluated[0].results.images if self.evaluated else 0
        return {m: significance.method_sentence(m, images, self.split, self.resamples, self.bootstrap_seed)
                for m in sorted(used)}

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
        tables = [(r.name, r.label, r.table(self.beam)) for r in self.shown]
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

    def to_json(self):
        """comparison.json (results.comparison_json): every group's values and every margin."""
        groups = [(g.name, [(r.name, r.folder, r.cfg["seed"]) for r in g.runs],
                   {b: {k: v for k in QUALITY + UNRESAMPLED if (v := g.values(b, k)) is not None} for b in self.beams})
                  for g in self.groups]
        return comparison_json(self.split, self.evaluated[0].results.images if self.evaluated else 0, self.beams,
                               {"resamples": self.resamples, "seed": self.bootstrap_seed,
                                "confidence": significance.CONFIDENCE}, self.methods(), groups, self.all_margins)


# The report, top to bottom: each section reads the Comparison and returns its Markdown lines. The header
# is rendered last, so that it carries every note the other sections made.
SECTIONS = (report.summary, report.quality, report.margins, report.across_pairs, report.cost, report.curves,
            report.metrics, report.self_critical, report.attention_maps, report.attention, report.maps_across,
            report.errors, report.every_image)


def parse_groups(p, args):
    """The groups of the command line: each plain run alone, then each --group NAME RUN [RUN ...]."""
    named = [(run, [run]) for run in args.runs] + [(g[0], g[1:]) for g in args.group or []]
    for name, folders in named:
        if not folders:
            p.error(f"--group {name} names no run: --group NAME RUN [RUN ...]")
    if len(named) < 2:
        p.error("give at least two runs, or two groups (--group NAME RUN [RUN ...])")
    groups = []
    for name, folders in named:
        runs = [Run(folder, args.split) for folder in folders]
        if len(runs) == 1 and name != folders[0]:  # a named group of one run: the group's name throughout
            runs[0].name = name
        groups.append(Group(runs[0].name, runs) if len(runs) == 1 else Group(name, runs))
    names = [g.name for g in groups]
    if len(set(names)) < len(names):
        twice = ", ".join(sorted({n for n in names if names.count(n) > 1}))
        p.error(f"two groups or runs have the same name ({twice}): name the groups apart (--group NAME ...)")
    for g in groups:
        check_group(g, args.split)
    by_name = {g.name: g for g in groups}
    if not args.pair:
        return groups, [(a, b) for i, a in enumerate(groups) for b in groups[i + 1:]]
    unknown = [n for pair in args.pair for n in pair if n not in by_name]
    if unknown:
        p.error(f"--pair names {', '.join(unknown)}, not a group or run of this comparison ({', '.join(names)})")
    for a, b in args.pair:
        if a == b:
            p.error(f"--pair {a} {b} pairs {a} with itself: name two different groups or runs")
    return groups, [(by_name[a], by_name[b]) for a, b in args.pair]


def main():
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="*", help="run folders (or results files eval.py wrote in one, say "
                   "runs/NAME/eval_TEST_argmax.json), each compared on its own")
    p.add_argument("--group", nargs="+", action="append", metavar=("NAME", "RUN"),
                   help="the runs of one configuration at several seeds, compared as one: --group attention "
                        "runs/demo-attention runs/seeds-attention-s1 runs/seeds-attention-s2 (repeat per group)")
    p.add_argument("--pair", nargs=2, action="append", metavar=("A", "B"),
                   help="give the margin B - A of these two groups or runs (repeat for more; default: every pair, "
                        "each later one against each earlier one)")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--split", default="TEST", choices=["TEST", "VAL"])
    p.add_argument("--beam-size", type=int, default=3, help="beam of the summary, margins, figures, errors and browser")
    p.add_argument("--resamples", type=int, default=significance.RESAMPLES,
                   help="bootstrap resamples of the test images for every interval")
    p.add_argument("--bootstrap-seed", type=int, default=significance.SEED, help="seed of the resamples")
    p.add_argument("--images", type=int, default=4, help="rows of attention overlays")
    p.add_argument("--thumb-size", type=int, default=160,
                   help="largest side of the browser's pictures in pixels (smaller images stay as they are)")
    p.add_argument("--browse-images", type=int, default=0, metavar="N",
                   help="the browser shows the first N images of the split (0: all; COCO's 5000 make a page of "
                        "about 70 MB at the default --thumb-size)")
    args = p.parse_args()
    if args.thumb_size < 16 or args.browse_images < 0 or args.resamples < 100:
        p.error("--thumb-size must be at least 16, --browse-images at least 0 and --resamples at least 100")
    groups, pairs = parse_groups(p, args)
    command = " ".join(["python compare.py", *args.runs, *(f"--group {' '.join(g)}" for g in args.group or []),
                        *(f"--pair {a} {b}" for a, b in args.pair or []), "--out", args.out])
    comparison = Comparison.of(groups, pairs, args.split, args.beam_size, args.out, command, overlays=args.images,
                               thumb=args.thumb_size, browse_images=args.browse_images, resamples=args.resamples,
                               bootstrap_seed=args.bootstrap_seed)
    os.makedirs(args.out, exist_ok=True)
    body = [line for section in SECTIONS for line in section(comparison)]
    md = report.header(comparison) + body
    for note in comparison.notes:
        print(f"note: {note}")
    text = "\n".join(md) + "\n"
    with atomic_path(os.path.join(args.out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(text)
    with atomic_path(os.path.join(args.out, "report.html")) as tmp, open(tmp, "w") as f:
        f.write(htmlpage.page(md[0].lstrip("# "), comparison.browser[0], htmlpage.markdown(text, args.out)))
    with atomic_path(os.path.join(args.out, "comparison.json")) as tmp:
        write_json(tmp, comparison.to_json())
    print(f"report: {os.path.join(args.out, 'report.md')}, report.html and comparison.json")


if __name__ == "__main__":
    run_cli(main)
