"""Evaluation results on disk, written by eval.py and read by compare.py, in one place.

Beside the checkpoint (or --out), with STEM = eval_{SPLIT}:

    STEM.json                    EvalResults: what was evaluated, and a BeamResult per beam size
    STEM_captions_beam{K}.json   the captions in the COCO results format: [{"image_id": id, "caption": "..."}]
    STEM_images_beam{K}.json     an ImageTable: per image of the split, in its order, an ImageRow with
                                 the caption and what is known of it (its own CIDEr and ROUGE-L, its
                                 BLEU counts and METEOR statistics, exact match, for shapes what it gets wrong, for
                                 attention the per-word maps): every corpus metric of any subset or
                                 resample of the images can be computed from them again

compare.py writes comparison.json beside its report (comparison_json). How a measure's values, margins
and p-values are written in reports (fmt...) is at the end of this file.

A later eval of the same checkpoint on the same images adds its beam sizes to the file and replaces
only the beam sizes it recomputed (merge); another checkpoint, other images or another attention
inference (hard attention's expected or argmax), or a file of an older FORMAT, replace it whole.
"""
import base64
import json
import os
import statistics
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np

from utils import InputError, atomic_path, write_json

# 2: the per-image files keep every statistic the corpus metrics are made of (BLEU counts, ROUGE-L,
# METEOR, the scene counts), so compare.py can resample the images; 3: and the attention mass on shapes. The
# Makefile's EVAL_FORMAT follows it.
FORMAT = 3
# The attention mass measures (metrics.mass_sums): colour and shape words together and apart, and the maps of each of
# a Transformer's first MAX_LAYERS layers (a deeper one's others are in the results files only)
MASS_KINDS = {"attention_mass": ("colour", "shape"), "attention_mass_colour": ("colour",),
              "attention_mass_shape": ("shape",)}
MAX_LAYERS = 6
MASS_MEASURES = (*MASS_KINDS, *(f"attention_mass_layer{n}" for n in range(1, MAX_LAYERS + 1)))

# What a BeamResult holds besides its metrics, as keys of the same JSON object.
BOOKKEEPING = ("images_per_s", "seconds", "max_len", "length_penalty", "block_ngram_repeat", "captions_file",
               "images_file", "others_cores")


@dataclass
class BeamResult:
    beam_size: int
    metrics: dict  # name -> value, None where it could not be computed (see EvalResults.unavailable)
    images_per_s: float  # decoding speed
    seconds: float
    max_len: int  # the decoding options
    length_penalty: float
    block_ngram_repeat: int
    captions_file: str  # file names beside the results file
    images_file: str
    others_cores: float | None = None  # other processes' CPU use while decoding (hardware.OtherLoad)

    def to_json(self):
        return {**self.metrics, **{k: getattr(self, k) for k in BOOKKEEPING}}

    @classmethod
    def from_json(cls, beam_size, entry, defaults):
        """defaults: the decoding options of files written before each beam kept its own."""
        metrics = {k: v for k, v in entry.items() if k not in BOOKKEEPING and k != "images"}
        return cls(beam_size, metrics, **{k: entry.get(k, defaults.get(k)) for k in BOOKKEEPING})


@dataclass
class EvalResults:
    checkpoint: str  # its absolute path
    weights: str | None  # a fingerprint of its weights (checkpoint.weights_id): which model was scored
    epoch: int
    split: str
    images: int
    data_folder: str
    data_name: str
    decoder: str
    decoder_parameters: int | None
    references: dict  # which references coco-caption used: kind (raw | encoded), per image min, max, mean
    config: dict  # the checkpoint's config
    beams: dict = field(default_factory=dict)  # beam size -> BeamResult, ascending
    unavailable: dict = field(default_factory=dict)  # metric -> why it could not run
    nltk_bleu4_references: str = "encoded"
    attention_inference: str | None = None  # attention decoder: expected (alpha-weighted mean) | argmax
    format: int = 1  # FORMAT of the eval.py that wrote it; files from before the field are 1

    def to_json(self):
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "beams"}
        out["results"] = {f"beam{k}": b.to_json() for k, b in sorted(self.beams.items())}
        return out

    @classmethod
    def from_json(cls, data):
        names = {f.name for f in fields(cls)} - {"beams"}
        top = {k: data.get(k) for k in names}
        top["unavailable"] = top["unavailable"] or {}
        top["nltk_bleu4_references"] = top["nltk_bleu4_references"] or "encoded"
        top["format"] = top["format"] or 1
        beams = {int(key[len("beam"):]): BeamResult.from_json(int(key[len("beam"):]), entry, data)
                 for key, entry in data["results"].items()}
        return cls(**top, beams=dict(sorted(beams.items())))

    @property
    def scored_on(self):
        """What these results scored, the one key of "the same data" (eval.py merges results only on the
        same, compare.py compares and groups runs only on the same): {"evaluated data", "split", "images"}."""
        return {"evaluated data": f"{self.data_name} in {os.path.realpath(self.data_folder)}", "split": self.split,
                "images": self.images}

    def same_evaluation(self, other):
        """Whether two results score the same model on the same images, with per-image files of the same
        format, so their beams can be merged."""
        key = lambda r: (r.weights, r.scored_on, r.attention_inference, r.format)  # noqa: E731
        return self.weights is not None and key(self) == key(other)


@dataclass
class ImageRow:
    """One image's caption and what eval.py found about it: enough to compute every corpus metric of
    any resample of the split's images again (significance.py), without Java or the references."""
    index: int  # in the split
    image_id: int | str  # the dataset's id (COCO's cocoid, a file name, ...)
    caption: str
    CIDEr: float  # its own, against its references (their mean over the split is the CIDEr)
    exact_match: bool  # equal to one of its encoded references
    describes_scene: bool | None = None  # shapes: names every object, nothing else, only true relations
    scene_errors: dict | None = None  # shapes: {"missing", "invented", "false"} phrases
    pointing: list | None = None  # attention on shapes, per word: 1 on a matching object, 0 not, None names none
    attention_mass: dict | None = None  # attention on shapes: metrics.mass_sums, its maps' and each layer's
    attention: str | None = None  # a decoder with maps: the per-word maps, attention_bytes
    bleu: dict | None = None  # coco-caption's BLEU counts (metrics.BLEU_KEYS): the corpus BLEU-1..4 from their sums
    nltk_bleu: dict | None = None  # the same counts as nltk makes them, against the encoded references
    ROUGE_L: float | None = None  # its own (their mean is the ROUGE-L)
    meteor: list | None = None  # METEOR's statistics (metrics.METEOR_STATS; without Java, None): the corpus METEOR
    scene: dict | None = None  # shapes: metrics.scene_counts (objects, phrases and relations, true ones)

    @property
    def right(self):
        """The rule every report uses: true of the scene where the data has one (shapes), else an
        exact match of a reference."""
        return self.exact_match if self.describes_scene is None else self.describes_scene


@dataclass
class ImageTable:
    split: str
    beam_size: int
    attention_grid: int | None  # the side of the maps' grid, None without maps
    rows: list  # ImageRow per image, in the split's order

    def to_json(self):
        return {"split": self.split, "beam_size": self.beam_size, "attention_grid": self.attention_grid,
                "images": [{k: v for k, v in asdict(r).items() if v is not None} for r in self.rows]}

    @classmethod
    def from_json(cls, data):
        return cls(data["split"], data["beam_size"], data["attention_grid"],
                   [ImageRow(**row) for row in data["images"]])

    @property
    def has_maps(self):
        return self.attention_grid is not None and all(r.attention is not None for r in self.rows)

    @property
    def has_statistics(self):
        """Whether every row has what significance.py resamples (eval.py before FORMAT 2 kept only CIDEr)."""
        return all(r.bleu is not None and r.nltk_bleu is not None and r.ROUGE_L is not None for r in self.rows)


def file_names(path, beam_size):
    """The captions file and the per-image file of one beam size, beside the results file `path`."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return f"{stem}_captions_beam{beam_size}.json", f"{stem}_images_beam{beam_size}.json"


def _read(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not valid JSON ({e}): evaluate again with eval.py") from None


def read_results(path):
    """The EvalResults in `path`, or None when there is none."""
    return EvalResults.from_json(_read(path)) if os.path.isfile(path) else None


def read_table(path, beam):
    """The ImageTable of one BeamResult of the results file `path`, or None when it is missing."""
    table = os.path.join(os.path.dirname(path), beam.images_file or "")
    return ImageTable.from_json(_read(table)) if beam.images_file and os.path.isfile(table) else None


def merge(old, new):
    """What the results file holds after `new`: `new`'s beam sizes added to `old`'s when both score
    the same model on the same images, else `new` alone. Returns (merged, a line saying what was
    replaced, or None when nothing was)."""
    if old is None:
        return new, None
    beams = lambda r: ", ".join(map(str, r.beams)) or "none"  # noqa: E731
    if not old.same_evaluation(new):
        why = ("an older eval.py's, which do not say which weights they scored" if old.weights is None else
               "an older eval.py's, without the per-image statistics compare.py resamples" if old.format != new.format
               else "another checkpoint, other images or another attention inference")
        return new, f"replaced the earlier results (beam {beams(old)}, {old.checkpoint} epoch {old.epoch}, " \
                    f"{old.images} images): {why}"
    redone, kept = sorted(set(old.beams) & set(new.beams)), sorted(set(old.beams) - set(new.beams))
    merged = replace(new, beams=dict(sorted({**old.beams, **new.beams}.items())),
                     unavailable={**old.unavailable, **new.unavailable})
    if not redone:
        return merged, None
    return merged, (f"replaced the earlier results of beam {', '.join(map(str, redone))}"
                    + (f"; kept beam {', '.join(map(str, kept))}" if kept else ""))


def write(path, results, captions, tables):
    """Write the results file and, per beam size in `tables`, its captions file (captions: beam ->
    [{"image_id", "caption"}]) and per-image file. Each is written whole or not at all."""
    folder = os.path.dirname(os.path.abspath(path))
    for k, table in tables.items():
        captions_file, images_file = file_names(path, k)
        for name, data in ((captions_file, captions[k]), (images_file, table.to_json())):
            with atomic_path(os.path.join(folder, name)) as tmp:
                write_json(tmp, data)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(results.to_json(), f, indent=1)


# ----------------------------------------------------------------------------- compare.py's comparison.json

def mean_sd(values):
    """(mean, sample standard deviation with ddof 1), the latter None for a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


@dataclass
class Interval:
    """A difference with its 95% interval and two-sided p-value (significance.margin); low, high and p
    are None for a measure with no per-image data."""
    difference: float
    low: float | None = None
    high: float | None = None
    p: float | None = None
    method: str | None = None  # "images" (the test images only) | "seeds" (seeds and images) | None: no interval

    @property
    def significant(self):
        """The interval excludes 0 (never for a measure without an interval)."""
        return self.low is not None and (self.low > 0 or self.high < 0)


@dataclass(kw_only=True)
class Margin(Interval):
    """Group b's value minus group a's on one measure at one beam size (the difference of the means
    over seeds), with its interval."""
    a: str
    b: str
    beam: int
    measure: str
    p_holm: float | None = None  # Holm-adjusted over the measures of this pair and beam size that have a p


MARGIN_KEYS = ("a", "b", "beam", "measure", "difference", "low", "high", "p", "p_holm", "method")


def comparison_json(split, images, beams, bootstrap, methods, groups, margins):
    """What compare.py writes as comparison.json:

        {"split", "images", "beams": [beam sizes],
         "bootstrap": {"resamples", "seed", "confidence"}, "methods": {method: the sentence saying what it is},
         "groups": [{"name", "runs": [{"name", "folder", "seed"}],
                     "metrics": {"beam{K}": {measure: {"value"} for one run | {"mean", "sd", "values"}}}}],
         "margins": [{"a", "b", "beam", "measure", "difference", "low", "high", "p", "p_holm", "method",
                      "significant"}]}

    groups: (name, [(run name, folder, seed)], {beam: {measure: [a value per run]}}); sd has ddof 1."""
    def summary(values):
        mean, sd = mean_sd(values)
        return {"value": mean} if sd is None else {"mean": mean, "sd": sd, "values": values}
    return {"split": split, "images": images, "beams": beams, "bootstrap": bootstrap, "methods": methods,
            "groups": [{"name": name, "runs": [{"name": n, "folder": f, "seed": s} for n, f, s in runs],
                        "metrics": {f"beam{b}": {k: summary(v) for k, v in by_measure.items()}
                                    for b, by_measure in metrics.items()}}
                       for name, runs, metrics in groups],
            "margins": [{k: getattr(m, k) for k in MARGIN_KEYS} | {"significant": m.significant} for m in margins]}


def attention_bytes(alphas):
    """Per-word attention maps (words x P) as base64 text of uint8 values, each map scaled so that its
    largest weight is 255: how the results files and the HTML pages keep maps small. visualize.overlay()
    normalises each smoothed map to its own range, and so does the pages' script, so the scale is all that
    is dropped."""
    maps = np.asarray(alphas, dtype=np.float64)
    peak = np.maximum(maps.max(axis=1, keepdims=True), 1e-12)
    return base64.b64encode(np.rint(maps / peak * 255).astype(np.uint8).tobytes()).decode("ascii")



# ----------------------------------------------------------------------------- how the numbers are written

PERCENT = {"pointing", *MASS_MEASURES, "exact_match", "exact_match_1_objects", "exact_match_2_objects",
           "exact_match_3_objects", "phrase_precision", "relation_accuracy", "val_top5"}

def label(key):
    """exact_match_2_objects -> "exact match, 2 objects"; attention_mass_layer2 -> "attention mass, layer 2"."""
    if key.startswith("attention_mass_"):
        part = key.split("_")[2]
        return f"attention mass, {'layer ' + part[5:] if part.startswith('layer') else part + ' words'}"
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


def fmt_margin(key, value, unit=True):
    if value is None:
        return "n/a"
    if key in PERCENT:
        return f"{value * 100:+.1f}" + (" pts" if unit else "")
    return f"{value:+.4f}"


def fmt_values(key, values):
    """One value, or the mean ± standard deviation (ddof 1) of a group's."""
    if values is None:
        return "n/a"
    mean, sd = mean_sd(values)
    if sd is None:
        return fmt(key, mean)
    return f"{fmt(key, mean)} ± {sd:.1%}" if key in PERCENT else f"{fmt(key, mean)} ± {sd:.4f}"


def fmt_interval(m):
    """A margin with its interval, "+0.2153 [+0.1980, +0.2330]" ("+36.2 pts [+32.1, +40.3]")."""
    if m.low is None:
        return fmt_margin(m.measure, m.difference)
    return (f"{fmt_margin(m.measure, m.difference)} [{fmt_margin(m.measure, m.low, unit=False)}, "
            f"{fmt_margin(m.measure, m.high, unit=False)}]")


def fmt_p(p):
    return "n/a" if p is None else "<0.001" if p < 0.001 else f"{p:.3f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
