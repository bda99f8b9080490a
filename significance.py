"""How sure a comparison is: every margin between two runs, or two groups of seeds, with a 95% interval
and a p-value that count the two sources of noise a captioning result has.

- Which test images. A paired bootstrap over the split's images: draw N images with replacement, the
  same draw for every run, and compute each metric again on the draw, R times (1,000 by default, seeded,
  so that a report is reproducible). Every corpus metric is a function of statistics that add up over
  images (eval.py keeps them per image, results.ImageRow): BLEU of its summed clipped matches, n-gram
  counts and lengths, as coco-caption and nltk sum them; METEOR of its summed alignment statistics, as
  its Java scorer sums them; ROUGE-L, CIDEr-D and exact match as means of per-image scores; the shapes
  measures, pointing and attention mass as ratios of summed counts. On all the images each gives the reported score
  (tested). CIDEr-D keeps each image's own score, whose document frequencies come from the whole split's
  references: the usual approximation, as a resample does not recount them. The draws are a count matrix
  (resamples x images) multiplied by each run's per-image statistics (images x columns): one matrix
  product per run.
- Which training run. With several seeds per configuration (compare.py --group), a margin is the
  difference of the groups' means, and its interval a Welch t-interval whose variance adds the seeds'
  (s^2 / n per group, ddof 1) and the image bootstrap's variance of the difference of the means; the
  degrees of freedom are Welch-Satterthwaite's from the seed terms. It assumes a group's seed results
  scatter normally around its mean. When only one group has several seeds, the other's seed variance is
  taken to be the same. With one run per group, the interval covers the test images only.

A margin is significant when its interval excludes 0. Intervals and p-values are per measure; the
report also counts the margins that stay significant after Holm's correction over the measures
compared.
"""
import math
from dataclasses import dataclass

import numpy as np

from metrics import bleu_vector, coco_bleu_from_sums, meteor_from_sums, meteor_vector, nltk_bleu_from_sums
from results import MASS_MEASURES, Interval

RESAMPLES, SEED, CONFIDENCE = 1000, 0, 0.95


def _ratio(sums):
    """sum of the first column / sum of the second, per resample (NaN where the second is 0)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[:, 0] / sums[:, 1]


def _each(fn, **kw):
    """A metric of one summed row (Python floats, math's exp and pow, as the scorers compute them:
    numpy's SIMD versions may differ in the last bit), applied to every resample."""
    return lambda sums: np.array([fn(row, **kw) for row in sums.tolist()])


@dataclass(frozen=True)
class Measure:
    """A corpus metric as a function of per-image statistics that add up over images."""
    columns: object  # ImageRow -> its statistics (a list of numbers), or None when the row lacks them
    aggregate: object  # summed statistics (resamples x columns) -> the metric per resample


def _exact_k(n):
    return Measure(lambda r: None if r.scene is None else [r.exact_match and r.scene["objects"] == n,
                                                           r.scene["objects"] == n], _ratio)


def _mean(value):
    return Measure(lambda r: None if value(r) is None else [value(r), 1], _ratio)


def _mass(name):
    """An attention mass measure: the summed mass of its words over their number (metrics.mass_sums)."""
    return Measure(lambda r: None if r.attention_mass is None or name not in r.attention_mass
                   else [r.attention_mass[name][0], r.attention_mass[name][2]], _ratio)


def _counts(key, true):
    return Measure(lambda r: None if r.scene is None else [r.scene[true], r.scene[key]], _ratio)


# Every quality measure, by the statistics eval.py keeps per image, in the order reports show them (report.QUALITY).
MEASURES = {
    **{f"BLEU-{n}": Measure(lambda r: None if r.bleu is None else bleu_vector(r.bleu),
                            _each(coco_bleu_from_sums, n=n)) for n in (1, 2, 3, 4)},
    "METEOR": Measure(lambda r: None if r.meteor is None else meteor_vector(r.meteor), _each(meteor_from_sums)),
    "ROUGE-L": _mean(lambda r: r.ROUGE_L),
    "CIDEr": _mean(lambda r: r.CIDEr),
    "nltk BLEU-4": Measure(lambda r: None if r.nltk_bleu is None else bleu_vector(r.nltk_bleu),
                           _each(nltk_bleu_from_sums)),
    "pointing": Measure(lambda r: None if r.pointing is None else [sum(p for p in r.pointing if p is not None),
                                                                    sum(p is not None for p in r.pointing)], _ratio),
    **{name: _mass(name) for name in MASS_MEASURES},
    "exact_match": _mean(lambda r: float(r.exact_match)),
    **{f"exact_match_{n}_objects": _exact_k(n) for n in (1, 2, 3)},
    "phrase_precision": _counts("phrases", "phrases_true"),
    "relation_accuracy": _counts("relations", "relations_true"),
}


def statistics(rows, name):
    """The per-image statistics of one measure (images x columns), or None when a row lacks them."""
    columns = [MEASURES[name].columns(r) for r in rows]
    return None if any(c is None for c in columns) else np.array(columns, dtype=np.float64)


def resample_counts(images, resamples=RESAMPLES, seed=SEED):
    """How often each image is drawn in each resample: (resamples x images), each row summing to
    `images`. The same matrix for every run makes the bootstrap paired."""
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, images, size=(resamples, images)) + images * np.arange(resamples)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * images).reshape(resamples, images).astype(np.float64)


def replicates(rows, names, counts):
    """{measure: (its value on all images, its value on each resample)} for the measures of `names`
    that every row has statistics for. One matrix product per run: counts (R x N) @ statistics (N x D)."""
    stats = {name: s for name in names if (s := statistics(rows, name)) is not None}
    if not stats:
        return {}
    widths = [s.shape[1] for s in stats.values()]
    table = np.concatenate(list(stats.values()), axis=1)  # N x D
    sums = counts @ table  # (R, N) @ (N, D) -> (R, D)
    full = table.sum(axis=0, keepdims=True)  # (1, D): the split itself
    out, at = {}, 0
    for (name, _), width in zip(stats.items(), widths, strict=True):
        measure = MEASURES[name]
        out[name] = (float(measure.aggregate(full[:, at:at + width])[0]), measure.aggregate(sums[:, at:at + width]))
        at += width
    return out


def margin(values_a, values_b, draws_a, draws_b, confidence=CONFIDENCE):
    """The margin b - a between two groups of runs on one measure, with its interval.

    values_*: each run's reported value (its corpus metric); draws_*: each run's (value on all images,
    values on the resamples), every run on the same resamples. The bootstrap's deviations from the value
    on all images are placed around the reported margin: the percentile interval, as the two values are
    the same (up to the order of a floating-point sum)."""
    n_a, n_b = len(values_a), len(values_b)
    difference = float(np.mean(values_b) - np.mean(values_a))
    spread = lambda draws: np.mean([rep - full for full, rep in draws], axis=0)  # noqa: E731
    deviation = spread(draws_b) - spread(draws_a)  # (R,): the image draws' effect on the margin
    deviation = deviation[~np.isnan(deviation)]  # a ratio with nothing to count in a resample
    tail = (1 - confidence) / 2
    if n_a == 1 and n_b == 1:
        shifted = difference + deviation
        low, high = np.quantile(shifted, [tail, 1 - tail])
        below, above = int((shifted <= 0).sum()), int((shifted >= 0).sum())
        p = min(1.0, 2 * (1 + min(below, above)) / (len(shifted) + 1))
        return Interval(difference, float(low), float(high), p, "images")
    from scipy.stats import t as student_t
    var_a = np.var(values_a, ddof=1) if n_a > 1 else None
    var_b = np.var(values_b, ddof=1) if n_b > 1 else None
    var_a = var_b if var_a is None else var_a  # one run alone: its seed variance taken as the other group's
    var_b = var_a if var_b is None else var_b
    terms = [(var_a / n_a, n_a - 1 if n_a > 1 else n_b - 1), (var_b / n_b, n_b - 1 if n_b > 1 else n_a - 1)]
    images = float(np.var(deviation, ddof=1))
    se = math.sqrt(sum(v for v, _ in terms) + images)
    if se == 0:
        return Interval(difference, difference, difference, 1.0 if difference == 0 else 0.0, "seeds")
    seed_part = sum(v * v / df for v, df in terms)
    df = (se ** 4 / seed_part) if seed_part > 0 else math.inf  # Welch-Satterthwaite; the bootstrap term's df is large
    half = float(student_t.ppf(1 - tail, df)) * se
    p = float(2 * student_t.sf(abs(difference) / se, df))
    return Interval(difference, difference - half, difference + half, p, "seeds")


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values (a list, in its order)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def method_sentence(method, images, split, resamples, seed, confidence=CONFIDENCE):
    """One sentence a report gives for each interval method it used."""
    level = f"{confidence:.0%}"
    if method == "images":
        return (f"{level} percentile intervals and two-sided p-values from a paired bootstrap over the {images} "
                f"{split} images ({resamples} resamples, seed {seed}): they count which test images were drawn, "
                "not which training run (one run per side)")
    return (f"{level} Welch t-intervals on the difference of the seed means, their variance the seeds' (s^2/n per "
            f"group) plus a paired bootstrap's over the {images} {split} images ({resamples} resamples, seed "
            f"{seed}), with Welch-Satterthwaite degrees of freedom; they assume that a configuration's results "
            "scatter normally from seed to seed")
