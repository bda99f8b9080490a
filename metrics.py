"""Caption metrics.

corpus_bleu is a dependency-free corpus BLEU (Papineni et al. 2002: clipped n-gram precision,
brevity penalty against the closest reference length), equal to nltk's corpus_bleu without
smoothing, short and empty captions included (tested). train.py uses it for validation, so training
needs neither nltk nor Java.
"""
import math
import os
import time
from collections import Counter

import torch

from utils import grid_side


def _ngrams(tokens, n):
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def corpus_bleu(references, hypotheses, max_n=4):
    """references: per hypothesis a list of token lists; hypotheses: token lists. Returns BLEU-max_n."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference sets for {len(hypotheses)} hypotheses")
    matched, total = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for refs, hyp in zip(references, hypotheses, strict=True):
        hyp_len += len(hyp)
        ref_len += min((len(r) for r in refs), key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_n + 1):
            counts = _ngrams(hyp, n)
            best = Counter()
            for r in refs:
                best |= _ngrams(r, n)  # max count of each n-gram over the references
            matched[n - 1] += sum(min(c, best[g]) for g, c in counts.items())
            total[n - 1] += max(1, len(hyp) - n + 1)  # as nltk: at least one n-gram per caption
    if hyp_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total, strict=True)) / max_n
    brevity = min(0.0, 1.0 - ref_len / hyp_len)
    return math.exp(log_precision + brevity)


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


def ptb_tokenize(captions):
    """{id: [sentence, ...]} -> {id: [tokenised lower-case string, ...]}, punctuation removed.

    coco-caption's Stanford PTBTokenizer when Java is there; otherwise nltk's Treebank tokenizer,
    which needs no downloaded data and agrees with it on ordinary captions."""
    if java_available():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
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
    cider): scores maps each name to BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE) as floats or None;
    unavailable maps the metrics that could not run to the reason; cider maps each name to every
    image's own CIDEr ({id: float}, their mean is the corpus CIDEr). `seconds`, a dict, gets the time
    each part took (tokenize, BLEU, METEOR, ROUGE-L, CIDEr, SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
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
        bleu = timed("BLEU", Bleu(4).compute_score, gts, res, verbose=0)[0]
        scores = {f"BLEU-{n + 1}": b for n, b in enumerate(bleu)}
        scores["METEOR"] = timed("METEOR", meteor.compute_score, gts, res)[0] if meteor else None
        scores["ROUGE-L"] = timed("ROUGE-L", Rouge().compute_score, gts, res)[0]
        scores["CIDEr"], cider = timed("CIDEr", Cider().compute_score, gts, res)
        per_image[name] = {i: float(c) for i, c in zip(gts, cider, strict=True)}  # Cider walks gts in order
        if spice:
            if "SPICE" in unavailable:
                scores["SPICE"] = None
            else:
                from pycocoevalcap.spice.spice import Spice
                scores["SPICE"] = timed("SPICE", Spice().compute_score, gts, res)[0]
        results[name] = {k: (float(v) if v is not None else None) for k, v in scores.items()}
    return results, unavailable, per_image


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

def pointing(words, maps, objects, image_size, vocab):
    """For every word of one caption that names a colour or a shape (in `vocab`: {word: attribute}), is
    the most attended grid cell's centre inside the box of an object with that colour or shape?

    words: the caption; maps: len(words) x P attention maps (P = G * G); objects: the image's
    {"colour", "shape", "box": [x0, y0, x1, y1]}. Returns per word None (it names no colour or shape)
    or (hit, chance), chance being the share of grid cells inside a matching box."""
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
        out.append((bool(inside.flatten()[int(amap.argmax())]), float(inside.float().mean())))
    return out


def pointing_accuracy(per_caption):
    """pointing() of every caption -> (accuracy, chance, words counted): the share of colour and shape
    words that hit, and the chance level averaged over the same words."""
    checked = [p for words in per_caption for p in words if p is not None]
    counted = len(checked)
    if not counted:
        return None, None, 0
    return sum(hit for hit, _ in checked) / counted, sum(chance for _, chance in checked) / counted, counted


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


def scene_measures(captions, references, boxes):
    """What BLEU cannot tell on templated captions, checked against each scene (shapes data):
    exact match (the caption is one of the references), also by number of objects; object-phrase
    precision (share of "size colour shape" phrases naming a real object); relation accuracy (share
    of "X left of / right of / above / below Y" statements true of the boxes)."""
    exact, by_count = [], {}
    phrases = phrases_ok = statements = statements_ok = 0
    for words, refs, objects in zip(captions, references, boxes, strict=True):
        hit = words in refs
        exact.append(hit)
        by_count.setdefault(len(objects), []).append(hit)
        where, found, _, true = _read_scene(words, objects)
        phrases += len(found)
        phrases_ok += sum(p in where for p in found)
        statements += len(true)
        statements_ok += sum(true)
    out = {"exact_match": sum(exact) / len(exact)}
    out.update({f"exact_match_{n}_objects": sum(v) / len(v) for n, v in sorted(by_count.items())})
    out["phrase_precision"] = phrases_ok / phrases if phrases else None
    out["relation_accuracy"] = statements_ok / statements if statements else None
    out["relation_statements"] = statements
    return out
