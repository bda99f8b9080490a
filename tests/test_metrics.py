"""Metrics against nltk and against values worked out by hand."""
import math
import random

import pytest
import torch

import metrics
from metrics import CiderD, corpus_bleu, nltk_bleu4, pointing_accuracy, ptb_tokenize


def coco_metrics(references, hypotheses, spice=False):
    scores, unavailable, _ = metrics.coco_metrics(references, {"run": hypotheses}, spice=spice)
    return scores["run"], unavailable


@pytest.mark.parametrize("ref_len,hyp_len", [((4, 12), (4, 12)), ((1, 8), (0, 5))])
def test_corpus_bleu_equals_nltk(ref_len, hyp_len):
    """Also on captions under 4 words and empty ones: nltk counts at least one n-gram per caption in
    the denominator, and so must corpus_bleu."""
    rng = random.Random(0)
    words = "a b c d e f g".split()
    for _ in range(30):
        refs = [[[rng.choice(words) for _ in range(rng.randint(*ref_len))] for _ in range(rng.randint(1, 5))]
                for _ in range(rng.randint(1, 30))]
        hyps = [[rng.choice(words) for _ in range(rng.randint(*hyp_len))] for _ in refs]
        assert corpus_bleu(refs, hyps) == pytest.approx(nltk_bleu4(refs, hyps), abs=1e-12)
    assert corpus_bleu([[["a", "b"]]], [["c", "d"]]) == 0.0
    exact = ["a", "dog", "runs", "on", "the", "grass"]
    # one exact caption plus "a dog": nltk 0.5338; counting only the n-grams a caption has gives 0.6065
    assert corpus_bleu([[exact], [exact]], [exact, ["a", "dog"]]) == pytest.approx(0.5338, abs=1e-4)


@pytest.mark.slow  # over 5 s alone: make test only
def test_empty_captions_and_string_ids_score_as_pycocoevalcap_does():
    """No placeholder for an empty caption: coco-caption scores the empty string itself."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    refs = {"a.jpg": ["a dog runs on grass", "the dog is running"], "b.jpg": ["a cat sits", "one cat"]}
    hyps = {"a.jpg": "a dog runs on grass", "b.jpg": ""}
    scores, _ = coco_metrics(refs, hyps)
    gts = ptb_tokenize(refs)
    res = {k: [v] for k, v in hyps.items()}
    assert scores["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-9)
    assert scores["BLEU-4"] == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0][3], abs=1e-9)


@pytest.mark.slow  # over 5 s alone: make test only
def test_hand_checked_values():
    refs = {0: ["the cat sat on the mat"], 1: ["a dog runs in a park"], 2: ["two birds fly over water"]}
    hyps = {0: "the cat sat on mat", 1: "a dog runs in a park", 2: "two birds fly over water"}
    scores, _ = coco_metrics(refs, {0: hyps[0], 1: "x", 2: "y"})
    # image 0 alone decides BLEU-1 here: 5/7 unigrams match (the cat sat on mat + x + y), and the
    # hypotheses (7 words) are shorter than the closest references (6 + 6 + 5 = 17 words)
    assert scores["BLEU-1"] == pytest.approx(5 / 7 * math.exp(1 - 17 / 7), rel=1e-6)
    scores, _ = coco_metrics({0: refs[0]}, {0: hyps[0]})
    # ROUGE-L: LCS 5, precision 5/5, recall 5/6, F with beta 1.2
    p, r, b2 = 1.0, 5 / 6, 1.2 ** 2
    assert scores["ROUGE-L"] == pytest.approx((1 + b2) * p * r / (r + b2 * p), rel=1e-6)
    scores, _ = coco_metrics(refs, {i: refs[i][0] for i in refs})
    assert scores["CIDEr"] == pytest.approx(10.0, rel=1e-6)  # identical to distinct references
    assert scores["BLEU-4"] == pytest.approx(1.0)


def test_without_java(monkeypatch):
    monkeypatch.setattr(metrics, "java_available", lambda: False)
    assert ptb_tokenize({0: ["A man, riding a horse."]}) == {0: ["a man riding a horse"]}
    scores, unavailable = coco_metrics({0: ["a man riding a horse"]}, {0: "A man riding a horse."}, spice=True)
    assert scores["METEOR"] is None and "Java" in unavailable["METEOR"]
    assert scores["SPICE"] is None and "SPICE" in unavailable
    assert scores["BLEU-4"] == pytest.approx(1.0)


@pytest.mark.skipif(not metrics.java_available(), reason="needs java")
@pytest.mark.slow  # over 5 s alone: make test only
def test_with_java(capfd):
    assert ptb_tokenize({0: ["A man, riding a horse."]}) == {0: ["a man riding a horse"]}
    assert "PTBTokenizer" not in capfd.readouterr().err  # Java's progress line at every call is dropped
    scores, unavailable = coco_metrics({0: ["a man riding a horse"], 1: ["a red bus"]},
                                       {0: "a man riding a horse", 1: "a blue car"}, spice=True)
    assert 0.3 < scores["METEOR"] < 1.0 and "METEOR" not in unavailable
    if metrics._spice_missing():  # offline: CoreNLP cannot be fetched, and that is reported, not raised
        assert scores["SPICE"] is None and "CoreNLP" in unavailable["SPICE"]


@pytest.mark.slow  # over 5 s alone: make test only
def test_several_systems_at_once_score_as_each_alone():
    refs = {0: ["a cat on a mat", "a cat sits"], 1: ["a dog runs", "the dog is running"]}
    systems = {"a": {0: "a cat", 1: "a dog runs"}, "b": {0: "a cat on the mat", 1: "dog"}}
    together, _, _ = metrics.coco_metrics(refs, systems)
    for name, hyps in systems.items():
        alone, _ = coco_metrics(refs, hyps)
        for k, v in alone.items():  # CIDEr-D's idf comes from the references, so it is the same too
            assert together[name][k] == pytest.approx(v, abs=1e-9), (name, k)


@pytest.mark.slow  # over 5 s alone: make test only
def test_per_image_cider_is_each_image_scored_as_pycocoevalcap_does():
    """Each image's own CIDEr, keyed by its id whatever the order of the ids, averages to the corpus CIDEr."""
    from pycocoevalcap.cider.cider import Cider
    refs = {"b": ["a cat on a mat", "a cat sits"], "a": ["a dog runs", "the dog is running"], "c": ["a red bus"]}
    hyps = {"a": "a dog", "b": "a cat on the mat", "c": ""}
    scores, _, per_image = metrics.coco_metrics(refs, {"run": hyps})
    cider = {i: image["CIDEr"] for i, image in per_image["run"].items()}
    assert set(cider) == set(refs)
    assert sum(cider.values()) / 3 == pytest.approx(scores["run"]["CIDEr"], abs=1e-12)
    gts, res = ptb_tokenize(refs), ptb_tokenize({i: [h] for i, h in hyps.items()})
    _, direct = Cider().compute_score(gts, res)
    assert [cider[i] for i in gts] == pytest.approx(list(direct), abs=1e-12)
    assert cider["c"] == 0.0 and cider["b"] > cider["a"] > 0


def test_pointing_and_attention_mass_by_hand():
    vocab = {"red": "colour", "circle": "shape", "blue": "colour"}
    objects = [{"colour": "red", "shape": "circle", "box": [0, 0, 32, 32]},      # top-left quadrant
               {"colour": "blue", "shape": "square", "box": [32, 32, 64, 64]}]  # bottom-right
    words = ["a", "red", "circle", "and", "a", "blue", "square"]
    maps = torch.zeros(len(words), 4)  # a 2 x 2 grid, row-major: top-left, top-right, bottom-left, bottom-right
    maps[1] = torch.tensor([0.7, 0.1, 0.1, 0.1])  # "red": most on the top-left cell, the red object's: hit, mass 0.7
    maps[2] = torch.tensor([0.3, 0.0, 0.0, 0.7])  # "circle": most on the bottom-right: miss, mass 0.3
    maps[5] = torch.tensor([0.0, 0.0, 0.4, 0.6])  # "blue": hit, mass 0.6 ("square" is not in vocab: not counted)
    by_word = metrics.pointing(words, maps, objects, 64, vocab)
    assert [None if p is None else (p.hit, p.chance, p.kind) for p in by_word] == [
        None, (True, 0.25, "colour"), (False, 0.25, "shape"), None, None, (True, 0.25, "colour"), None]
    assert [p.mass for p in by_word if p] == pytest.approx([0.7, 0.3, 0.6])
    acc, chance, counted = pointing_accuracy([by_word])
    assert counted == 3 and acc == pytest.approx(2 / 3) and chance == pytest.approx(0.25)
    sums = metrics.mass_sums(by_word)  # [summed mass, summed chance, words]
    assert sums["attention_mass"] == pytest.approx([1.6, 0.75, 3])
    assert sums["attention_mass_colour"] == pytest.approx([1.3, 0.5, 2])
    assert sums["attention_mass_shape"] == pytest.approx([0.3, 0.25, 1])
    assert metrics.mass_sums(by_word, layer=2) == {"attention_mass_layer2": pytest.approx([1.6, 0.75, 3])}
    two = [{"colour": "red", "shape": "circle", "box": [0, 0, 64, 32]}]  # the top half: two cells, chance 0.5
    [_, red, *_] = metrics.pointing(words[:2], maps[:2], two, 64, vocab)
    assert red.mass == pytest.approx(0.8) and red.chance == 0.5 and red.hit


def test_scene_errors_name_what_is_wrong():
    from metrics import scene_errors
    objects = [{"size": "small", "colour": "red", "shape": "circle", "box": [0, 0, 10, 10]},
               {"size": "large", "colour": "blue", "shape": "square", "box": [40, 0, 60, 20]},
               {"size": "small", "colour": "green", "shape": "diamond", "box": [0, 40, 10, 50]}]
    true = "a small red circle to the left of a large blue square".split()
    assert scene_errors(true, objects) == {"missing": ["small green diamond"], "invented": [], "false": []}
    wrong = "a small red circle to the right of a large blue square and a small red triangle".split()
    assert scene_errors(wrong, objects) == {
        "missing": ["small green diamond"], "invented": ["small red triangle"],
        "false": ["small red circle to the right of large blue square"]}


def test_scene_measures_on_true_and_corrupted_captions():
    import shapes
    from metrics import describes_scene, scene_measures
    refs, objects = [], []
    for i in range(60):
        scene = shapes.make_scene(shapes.scene_seed(3, i), 64)
        refs.append(shapes.captions(scene))
        objects.append(shapes.boxes(scene, shapes.render(scene)[1]))
    relational = [r[2] for r in refs if len(r[2]) > 6]  # with several objects, the third template is a chain
    assert relational
    perfect = scene_measures([r[2] for r in refs], refs, objects)
    assert perfect["exact_match"] == 1.0 and perfect["phrase_precision"] == 1.0
    assert perfect["relation_accuracy"] == 1.0 and perfect["relation_statements"] > 20
    assert all(describes_scene(r[2], o) for r, o in zip(refs, objects, strict=True))
    swap = {"left": "right", "right": "left", "above": "below", "below": "above"}
    flipped = [[swap.get(w, w) for w in r[2]] for r in refs]
    bad = scene_measures(flipped, refs, objects)
    assert bad["relation_accuracy"] == 0.0 and bad["phrase_precision"] == 1.0
    assert bad["exact_match"] == perfect["exact_match_1_objects"] * sum(len(o) == 1 for o in objects) / 60
    recoloured = [[{"red": "blue", "blue": "red"}.get(w, w) for w in r[0]] for r in refs]
    assert scene_measures(recoloured, refs, objects)["phrase_precision"] < 1.0


def test_cider_d_equals_pycocoevalcap():
    """With the scored set's references as the corpus, CIDEr-D equals coco-caption's Cider to 1e-6:
    repeated words, an empty caption and one longer than every reference included."""
    from pycocoevalcap.cider.cider import Cider  # noqa: F811
    rng = random.Random(0)
    words = "a b c d e f g h i j".split()
    refs = {i: [" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(1, 6))]
            for i in range(40)}
    cands = {i: " ".join(rng.choice(words) for _ in range(rng.randint(1, 9))) for i in refs}
    cands[0], cands[1], cands[2] = "a a a a a", "", " ".join(["b"] * 30)
    _, expected = Cider().compute_score(refs, {i: [c] for i, c in cands.items()})
    cider = CiderD([[r.split() for r in refs[i]] for i in refs])
    got = cider.score([cands[i].split() for i in refs], [[r.split() for r in refs[i]] for i in refs])
    assert max(abs(a - b) for a, b in zip(got, expected, strict=True)) < 1e-6
    ids = CiderD([[[words.index(w) for w in r.split()] for r in refs[i]] for i in refs])  # ids score as words
    assert ids.score([[words.index(w) for w in cands[3].split()]], [[[words.index(w) for w in r.split()]
                                                                    for r in refs[3]]])[0] == pytest.approx(got[3])
