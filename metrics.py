"""Caption metrics.

corpus_bleu is a dependency-free corpus BLEU (Papineni et al. 2002: clipped n-gram precision,
brevity penalty against the closest reference length), equal to nltk's corpus_bleu without
smoothing, short and empty captions included (tested). train.py uses it for validation, so training
needs neither nltk nor Java.

Every corpus metric here is also a function of per-image statistics that add up over images: BLEU's
counts (coco-caption's and nltk's rules), METEOR's alignment statistics, each image's ROUGE-L and
CIDEr-D, the scene counts. eval.py keeps them per image, and significance.py resamples them.
"""
import contextlib
import math
import os
import sys
import tempfile
import time
from collections import Counter
from typing import NamedTuple

import torch

from results import MASS_KINDS
from utils import grid_side


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


# ----------------------------------------------------------------------------- BLEU from counts

# One caption's BLEU counts, the same shape under both protocols: {"hyp_len": its length, "ref_len": the
# closest reference length (a tie goes to the shorter), "guess": n-grams counted per order, "correct": the
# clipped matches per order}. A corpus BLEU is a function of their sums over the captions, which is what
# lets significance.py resample images without scoring anything again.
BLEU_KEYS = ("hyp_len", "ref_len", "guess", "correct")


def bleu_vector(counts, max_n=4):
    """A caption's counts as one flat row: hyp_len, ref_len, guess 1..n, correct 1..n."""
    return [counts["hyp_len"], counts["ref_len"], *counts["guess"][:max_n], *counts["correct"][:max_n]]


def nltk_counts(references, hypothesis, max_n=4):
    """One caption's counts as nltk's corpus_bleu makes them: token lists; at least one n-gram per
    order in "guess", even for a caption shorter than n (or empty)."""
    hyp_len = len(hypothesis)
    correct, guess = [], []
    for n in range(1, max_n + 1):
        counts = _ngrams(hypothesis, n)
        best = Counter()
        for r in references:
            best |= _ngrams(r, n)  # max count of each n-gram over the references
        correct.append(sum(min(c, best[g]) for g, c in counts.items()))
        guess.append(max(1, hyp_len - n + 1))
    ref_len = min((len(r) for r in references), key=lambda n: (abs(n - hyp_len), n))
    return {"hyp_len": hyp_len, "ref_len": ref_len, "guess": guess, "correct": correct}


def nltk_bleu_from_sums(sums, max_n=4):
    """nltk's corpus_bleu (no smoothing, uniform weights) from summed counts (bleu_vector order), with its
    rules: 0 when no unigram matches, sys.float_info.min for a higher order without a match, the brevity
    penalty 1 when the captions are longer than the references and 0 when they are empty."""
    hyp_len, ref_len = sums[0], sums[1]
    guess, correct = sums[2:2 + max_n], sums[2 + max_n:2 + 2 * max_n]
    if correct[0] == 0:
        return 0.0
    # nltk takes each precision as a Fraction of the integer sums; float() of it is the correctly rounded
    # quotient, and so is the division of the two sums (exact integers in a float below 2**53)
    precisions = [c / g if c else sys.float_info.min for c, g in zip(correct, guess, strict=True)]
    penalty = 1.0 if hyp_len > ref_len else 0.0 if hyp_len == 0 else math.exp(1 - ref_len / hyp_len)
    return penalty * math.exp(math.fsum(1 / max_n * math.log(p) for p in precisions))


def coco_bleu_from_sums(sums, n, max_n=4):
    """coco-caption's corpus BLEU-n (pycocoevalcap's BleuScorer, option "closest") from summed counts
    (bleu_vector order), with its constants: 1e-15 added to matches and lengths, 1e-9 to n-gram counts
    and reference lengths, so that no division is by zero."""
    tiny, small = 1e-15, 1e-9
    hyp_len, ref_len = float(sums[0]), float(sums[1])
    guess, correct = sums[2:2 + max_n], sums[2 + max_n:2 + 2 * max_n]
    bleu = 1.0
    for k in range(n):
        bleu *= (float(correct[k]) + tiny) / (float(guess[k]) + small)
    bleu **= 1.0 / n
    ratio = (hyp_len + tiny) / (ref_len + small)
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


# ----------------------------------------------------------------------------- METEOR from its statistics

# METEOR 1.5 as coco-caption runs it (English, -norm): alpha, beta, gamma, delta and the weights of its four
# matchers (exact, stem, synonym, paraphrase). meteor_from_sums with them gives the Java scorer's own scores,
# per image and for the corpus (tested where Java is).
METEOR_PARAMETERS = {"alpha": 0.85, "beta": 0.2, "gamma": 0.6, "delta": 0.75, "weights": (1.0, 0.6, 0.8, 0.6)}
METEOR_STATS = 23  # per image, the scorer's sufficient statistics against its best-scoring reference:
# test and reference length, their function words, per matcher (test, reference) x (content, function) matches,
# chunks, test and reference words matched


def _meteor_stages(stats):
    return [stats[4 + 4 * i:8 + 4 * i] for i in range(4)]  # test content, ref content, test function, ref function


def meteor_vector(stats):
    """One image's statistics as the Java scorer adds them up: a caption aligned with its reference in one
    chunk, every word matched, contributes no chunk to the sum."""
    stages = _meteor_stages(stats)
    whole = (sum(s[0] + s[2] for s in stages) == stats[0] and sum(s[1] + s[3] for s in stages) == stats[1]
             and stats[20] == 1)
    return [*stats[:20], 0.0 if whole else stats[20], *stats[21:]]


def meteor_from_sums(sums, p=METEOR_PARAMETERS):
    """METEOR from summed statistics (meteor_vector order), as the Java scorer computes it: weighted
    precision and recall of the matches, their alpha-weighted harmonic mean, times 1 - gamma * frag ** beta."""
    test_len, ref_len, test_function, ref_function = sums[:4]
    stages = _meteor_stages(sums)
    chunks, test_words, ref_words = sums[20:23]
    delta, weights = p["delta"], p["weights"]
    test_weighted_len = delta * (test_len - test_function) + (1.0 - delta) * test_function
    ref_weighted_len = delta * (ref_len - ref_function) + (1.0 - delta) * ref_function
    test_matched = ref_matched = 0.0
    for k in (0, 2):  # content words weigh delta, function words 1 - delta: the Java scorer's order of sums
        share = delta if k == 0 else 1.0 - delta
        for stage, w in zip(stages, weights, strict=True):
            test_matched += stage[k] * w * share
        for stage, w in zip(stages, weights, strict=True):
            ref_matched += stage[k + 1] * w * share
    if not (test_matched and ref_matched and test_weighted_len and ref_weighted_len):
        return 0.0  # the Java scorer's NaN (a division by zero) -> 0
    precision, recall = test_matched / test_weighted_len, ref_matched / ref_weighted_len
    f_mean = 1.0 / (((1.0 - p["alpha"]) / precision) + (p["alpha"] / recall))
    whole = (sum(s[0] + s[2] for s in stages) == test_len and sum(s[1] + s[3] for s in stages) == ref_len
             and chunks == 1)
    frag = 0.0 if whole else chunks / ((test_words + ref_words) / 2)
    return max(f_mean * (1.0 - p["gamma"] * math.pow(frag, p["beta"])), 0.0)


def corpus_bleu(references, hypotheses, max_n=4):
    """references: per hypothesis a list of token lists; hypotheses: token lists. Returns BLEU-max_n as
    nltk's corpus_bleu computes it."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    rows = [bleu_vector(nltk_counts(refs, hyp, max_n), max_n) for refs, hyp in zip(references, hypotheses, strict=True)]
    return nltk_bleu_from_sums([sum(column) for column in zip(*rows, strict=True)] if rows else [0] * (2 + 2 * max_n),
                               max_n)


class CiderD:
    """CIDEr-D (Vedantam et al. 2015) as coco-caption's Cider computes it (clipped tf-idf n-gram
    vectors, a Gaussian length penalty on the bigram counts, x10), but with the document frequencies
    of a fixed corpus: self-critical training takes them once from all TRAIN references, not from
    each batch. With the scored set's own references as the corpus it equals pycocoevalcap's Cider
    (tested). Captions are token sequences: words, or word ids, as long as both sides agree."""

    def __init__(self, corpus, n=4, sigma=6.0):
        """corpus: per image, its reference captions (token sequences)."""
        self.n, self.sigma = n, sigma
        self.df = Counter()
        for refs in corpus:
            self.df.update({g for r in refs for k in range(1, n + 1) for g in _ngrams(list(r), k)})
        self.log_images = math.log(max(len(corpus), 1))
        self._refs = {}  # reference vectors, reused across samples and steps

    def vector(self, tokens):
        """(per n-gram order a {n-gram: tf-idf weight}, their norms, the bigram count)."""
        vec, norm = [{} for _ in range(self.n)], [0.0] * self.n
        tokens = list(tokens)
        for k in range(1, self.n + 1):
            for g, tf in _ngrams(tokens, k).items():
                w = tf * (self.log_images - math.log(max(1.0, self.df[g])))
                vec[k - 1][g] = w
                norm[k - 1] += w * w
        return vec, [math.sqrt(x) for x in norm], max(len(tokens) - 1, 0)

    def _ref_vectors(self, refs):
        key = tuple(tuple(r) for r in refs)
        if key not in self._refs:
            if len(self._refs) > 100000:
                self._refs.clear()
            self._refs[key] = [self.vector(r) for r in refs]
        return self._refs[key]

    def score(self, candidates, references):
        """CIDEr-D of each candidate against its references (a list per candidate)."""
        scores = []
        for cand, refs in zip(candidates, references, strict=True):
            vec, norm, length = self.vector(cand)
            total = 0.0
            for vec_r, norm_r, length_r in self._ref_vectors(refs):
                penalty = math.exp(-((length - length_r) ** 2) / (2 * self.sigma ** 2))
                for k in range(self.n):
                    val = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec[k].items())
                    if norm[k] and norm_r[k]:
                        val /= norm[k] * norm_r[k]
                    total += val * penalty
            scores.append(10.0 * total / self.n / len(refs))
        return scores


# ----------------------------------------------------------------------------- coco-caption

PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
               "...", ";"}  # what coco-caption's PTBTokenizer drops


def java_available():
    import shutil
    return shutil.which("java") is not None


@contextlib.contextmanager
def without_java_progress():
    """The Java tokenizer prints "PTBTokenizer tokenized N tokens at ..." on the process's stderr at
    every call: pass on everything else it writes there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines():
                if not line.startswith("PTBTokenizer tokenized"):
                    print(line, file=sys.stderr)


def ptb_tokenize(captions):
    """{id: [sentence, ...]} -> {id: [tokenised lower-case string, ...]}, punctuation removed.

    coco-caption's Stanford PTBTokenizer when Java is there; otherwise nltk's Treebank tokenizer,
    which needs no downloaded data and agrees with it on ordinary captions."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        with without_java_progress():
            return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    from nltk.tokenize import TreebankWordTokenizer
    tok = TreebankWordTokenizer()
    return {k: [" ".join(w for w in tok.tokenize(c.lower()) if w not in PUNCTUATION) for c in v]
            for k, v in captions.items()}


def _spice_missing():
    """Why SPICE cannot run here, or None. It needs Java and Stanford CoreNLP 3.6.0, which pycocoevalcap
    downloads on first use: offline that download fails, so we check first instead of crashing."""
    import pycocoevalcap.spice
    if not java_available():
        return "needs Java (not found on PATH)"
    jar = os.path.join(os.path.dirname(pycocoevalcap.spice.__file__), "lib", "stanford-corenlp-3.6.0.jar")
    if not os.path.exists(jar):
        return (f"needs Stanford CoreNLP 3.6.0 ({jar} is missing; pycocoevalcap downloads it on first use, "
                "which needs internet)")
    return None


def coco_metrics(references, systems, spice=False, seconds=None):
    """coco-caption scores, as papers report them, for one or more sets of captions of the same images
    (say, one per beam size: the references are tokenised once and Java started once per tool).

    references: {id: [sentence, ...]}; systems: {name: {id: sentence}}. Returns (scores, unavailable,
    per_image): scores maps each name to BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) as floats or None;
    unavailable maps the metrics that could not run to the reason; per_image maps each name to every
    image's own share of them, {id: {"bleu": its BLEU counts (BLEU_KEYS), "meteor": its METEOR statistics
    (METEOR_STATS numbers, None without Java), "ROUGE-L", "CIDEr"}}: the corpus BLEU and METEOR are
    coco_bleu_from_sums and meteor_from_sums of the summed statistics, ROUGE-L and CIDEr the means of
    the per-image scores. `seconds`, a dict, gets the time each part took (tokenize, BLEU, METEOR, ROUGE-L,
    CIDEr, SPICE)."""
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    seconds = {} if seconds is None else seconds

    def timed(part, fn, *args, **kw):
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        seconds[part] = seconds.get(part, 0.0) + time.perf_counter() - t0
        return out

    ids = sorted(next(iter(systems.values())))
    gts = timed("tokenize", ptb_tokenize, {i: references[i] for i in ids})
    tokens = timed("tokenize", ptb_tokenize, {(name, i): [hyps[i]] for name, hyps in systems.items() for i in ids})
    unavailable = {}
    java = java_available()
    if not java:
        unavailable["METEOR"] = "needs Java (not found on PATH)"
    if spice and _spice_missing():
        unavailable["SPICE"] = _spice_missing()
    meteor = None
    if java:
        from pycocoevalcap.meteor.meteor import Meteor
        meteor = timed("METEOR", Meteor)
    results, per_image = {}, {}
    for name in systems:
        res = {i: [tokens[(name, i)][0]] for i in ids}  # an empty caption scores as it is
        bleu, counts = timed("BLEU", _coco_bleu, gts, res)
        scores = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
        meteor_images = [None] * len(gts)
        scores["METEOR"] = None
        if meteor:
            scores["METEOR"], meteor_images = timed("METEOR", _coco_meteor, meteor, gts, res)
        scores["ROUGE-L"], rouge = timed("ROUGE-L", Rouge().compute_score, gts, res)
        scores["CIDEr"], cider = timed("CIDEr", Cider().compute_score, gts, res)
        per_image[name] = {i: {"bleu": b, "meteor": m, "ROUGE-L": float(r), "CIDEr": float(c)}
                           for i, b, m, r, c in zip(gts, counts, meteor_images, rouge, cider, strict=True)}  # gts order
        if spice:
            if "SPICE" in unavailable:
                scores["SPICE"] = None
            else:
                from pycocoevalcap.spice.spice import Spice
                scores["SPICE"] = timed("SPICE", Spice().compute_score, gts, res)[0]
        results[name] = {k: (float(v) if v is not None else None) for k, v in scores.items()}
    return results, unavailable, per_image


def _coco_meteor(meteor, gts, res):
    """pycocoevalcap's Meteor.compute_score, keeping what it throws away: each image's statistics
    (METEOR_STATS numbers). Returns (the corpus METEOR, [statistics per image in gts' order]), or the
    statistics None where meteor_from_sums would not give the Java scorer's score (another METEOR)."""
    with meteor.lock:
        stats = [meteor._stat(res[i][0], gts[i]) for i in gts]  # one SCORE line per image, as compute_score does
        meteor.meteor_p.stdin.write(f"EVAL ||| {' ||| '.join(stats)}\n".encode())
        meteor.meteor_p.stdin.flush()
        scores = [float(meteor.meteor_p.stdout.readline().strip()) for _ in gts]
        score = float(meteor.meteor_p.stdout.readline().strip())
    stats = [[float(x) for x in line.split()] for line in stats]
    total = [sum(column) for column in zip(*map(meteor_vector, stats), strict=True)]
    if any(len(s) != METEOR_STATS for s in stats) or abs(meteor_from_sums(total) - score) > 1e-9 or any(
            abs(meteor_from_sums(meteor_vector(s)) - x) > 1e-9 for s, x in zip(stats, scores, strict=True)):
        return score, [None] * len(stats)
    return score, stats


def _coco_bleu(gts, res):
    """pycocoevalcap's Bleu(4).compute_score, keeping what it throws away: each image's counts. Returns
    ([BLEU-1..4], [counts per image in gts' order])."""
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer
    scorer = BleuScorer(n=4)
    for i in gts:  # as Bleu does: one test caption and its references per image, in gts' order
        scorer += (res[i][0], gts[i])
    bleu, _ = scorer.compute_score(option="closest", verbose=0)
    counts = []
    for cooked in scorer.ctest:  # the reference lengths are kept whole; "closest" picks one per caption
        testlen = cooked["testlen"]
        counts.append({"hyp_len": testlen, "ref_len": min((abs(n - testlen), n) for n in cooked["reflen"])[1],
                       "guess": list(cooked["guess"]), "correct": list(cooked["correct"])})
    return bleu, counts


def nltk_bleu4(references, hypotheses):
    """nltk's corpus_bleu on token lists: the number sgrvinod's tutorial (and the reference experiment) report.
    Its warning that short captions have no 2-, 3- or 4-gram overlaps is not printed: the score
    counts them as nltk does (corpus_bleu above equals it, short and empty captions included)."""
    import warnings

    from nltk.translate.bleu_score import corpus_bleu as nltk_corpus_bleu
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"\s*The hypothesis contains 0 counts")
        return float(nltk_corpus_bleu(references, hypotheses))


# ----------------------------------------------------------------------------- attention

class Pointed(NamedTuple):
    """Where one colour or shape word's map lies against the objects it names."""
    hit: bool  # the most attended cell's centre is on an object of that colour or shape (pointing)
    mass: float  # the share of the map on those cells (attention mass, Liu et al. 2017's attention correctness)
    chance: float  # the share of the grid's cells on them: either measure's level for a uniform map
    kind: str  # the attribute the word names: "colour" or "shape"


def pointing(words, maps, objects, image_size, vocab):
    """For every word of one caption that names a colour or a shape (in `vocab`: {word: attribute}), where
    its map lies against the cells whose centre is inside the box of an object with that colour or shape.

    words: the caption; maps: len(words) x P attention maps (P = G * G); objects: the image's
    {"colour", "shape", "box": [x0, y0, x1, y1]}. Returns per word None (it names no colour or shape)
    or a Pointed."""
    grid = grid_side(maps.shape[1])
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) * image_size / grid
    out = []
    for word, amap in zip(words, maps, strict=False):
        if word not in vocab:
            out.append(None)
            continue
        inside = torch.zeros(grid, grid, dtype=torch.bool)  # rows: y, columns: x
        for obj in objects:
            if obj[vocab[word]] == word:
                x0, y0, x1, y1 = obj["box"]
                inside |= ((centres >= y0) & (centres < y1))[:, None] & ((centres >= x0) & (centres < x1))[None]
        inside, amap = inside.flatten(), amap.double()
        out.append(Pointed(bool(inside[int(amap.argmax())]), float(amap[inside].sum() / amap.sum()),
                           float(inside.double().mean()), vocab[word]))
    return out


def pointing_accuracy(per_caption):
    """pointing() of every caption -> (accuracy, chance, words counted): the share of colour and shape
    words that hit, and the chance level averaged over the same words."""
    checked = [p for words in per_caption for p in words if p is not None]
    counted = len(checked)
    if not counted:
        return None, None, 0
    return sum(p.hit for p in checked) / counted, sum(p.chance for p in checked) / counted, counted


def mass_sums(pointed, layer=None):
    """One caption's pointing() as sums that add up over images, {measure: [summed mass, summed chance,
    words]}: of the colour and shape words together and apart (MASS_KINDS), or with `layer` (a Transformer
    layer's maps, from 1) together, as attention_mass_layer{layer}. A measure is its mass over its words."""
    kinds = {f"attention_mass_layer{layer}": ("colour", "shape")} if layer else MASS_KINDS
    words = {name: [p for p in pointed if p is not None and p.kind in named] for name, named in kinds.items()}
    return {name: [sum(p.mass for p in w), sum(p.chance for p in w), len(w)] for name, w in words.items()}


# ----------------------------------------------------------------------------- shapes scenes

def _read_scene(words, objects):
    """A caption against its scene: the objects by (size, colour, shape) -> box, the object phrases the
    caption names, its relation statements, and for each whether the boxes bear it out."""
    import shapes
    where = {(o["size"], o["colour"], o["shape"]): o["box"] for o in objects}
    found, said = shapes.parse(words)
    true = [a in where and b in where and shapes.relation_holds(where[a], rel, where[b]) for a, rel, b in said]
    return where, found, said, true


def describes_scene(words, objects):
    """Does a caption name every object of the scene, nothing else, and state only true relations?"""
    where, found, _, true = _read_scene(words, objects)
    return set(found) == set(where) and all(true)


def scene_errors(words, objects):
    """What a caption gets wrong about its scene, as phrases: the objects it leaves out ("missing"),
    the ones it names that are not there ("invented") and its false relation statements ("false")."""
    where, found, said, true = _read_scene(words, objects)
    return {"missing": [" ".join(p) for p in where if p not in found],
            "invented": [" ".join(p) for p in dict.fromkeys(found) if p not in where],
            "false": [f"{' '.join(a)} {rel} {' '.join(b)}" for (a, rel, b), ok in zip(said, true, strict=True)
                      if not ok]}


def scene_counts(words, objects):
    """One caption against its scene, as counts that add up over images: the scene's objects, the object
    phrases the caption names and how many of them name a real object, its relation statements and how
    many are true of the boxes."""
    where, found, _, true = _read_scene(words, objects)
    return {"objects": len(objects), "phrases": len(found), "phrases_true": sum(p in where for p in found),
            "relations": len(true), "relations_true": sum(true)}


def scene_measures(captions, references, boxes):
    """What BLEU cannot tell on templated captions, checked against each scene (shapes data):
    exact match (the caption is one of the references), also by number of objects; object-phrase
    precision (share of "size colour shape" phrases naming a real object); relation accuracy (share
    of "X left of / right of / above / below Y" statements true of the boxes)."""
    exact = [words in refs for words, refs in zip(captions, references, strict=True)]
    counts = [scene_counts(words, objects) for words, objects in zip(captions, boxes, strict=True)]
    return scene_measures_of(exact, counts)


def scene_measures_of(exact, counts):
    """scene_measures from each image's exact match and scene_counts."""
    total = Counter()
    for c in counts:
        total.update(c)
    out = {"exact_match": sum(exact) / len(exact)}
    for n in sorted({c["objects"] for c in counts}):
        hits = [e for e, c in zip(exact, counts, strict=True) if c["objects"] == n]
        out[f"exact_match_{n}_objects"] = sum(hits) / len(hits)
    out["phrase_precision"] = total["phrases_true"] / total["phrases"] if total["phrases"] else None
    out["relation_accuracy"] = total["relations_true"] / total["relations"] if total["relations"] else None
    out["relation_statements"] = total["relations"]
    return out
