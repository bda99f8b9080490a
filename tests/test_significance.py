"""significance.py and compare.py's groups on results files alone (no training): corpus metrics from
summed per-image statistics, the paired bootstrap, the seeds' intervals, their coverage, and what a
report says of them."""
import json
import random

import numpy as np
import pytest
import yaml

import compare
import metrics
import results
import significance
from config import default_config
from report import QUALITY
from tests.helpers import run_main


def random_captions(images=40):
    """References, and three systems' captions of the same images: random words (an empty caption and
    one of two words among them), every reference's first one, and a mix of both."""
    rng = random.Random(0)
    words = "a the red blue dog cat runs sits on grass mat big small".split()
    sentence = lambda lo, hi: " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    refs = {i: [sentence(1, 10) for _ in range(rng.randint(1, 5))] for i in range(images)}
    noise = {i: sentence(0, 10) for i in refs}
    noise[0], noise[1] = "", "a dog"
    copy = {i: refs[i][0] for i in refs}
    mixed = {i: copy[i] if rng.random() < 0.3 else noise[i] for i in refs}
    return refs, {"noise": noise, "copy": copy, "mixed": mixed}


@pytest.fixture(scope="module")
def scored():
    """{system: (ImageRows with coco-caption's per-image statistics, its corpus scores)}, one scoring
    of the three systems (Java starts once: it takes seconds)."""
    refs, systems = random_captions()
    scores, _, per_image = metrics.coco_metrics(refs, systems)
    out = {}
    for name, hyps in systems.items():
        rows = []
        for k, i in enumerate(sorted(refs)):
            image, words, tokens = per_image[name][i], hyps[i].split(), [r.split() for r in refs[i]]
            rows.append(results.ImageRow(k, i, hyps[i], image["CIDEr"], words in tokens, bleu=image["bleu"],
                                         nltk_bleu=metrics.nltk_counts(tokens, words), ROUGE_L=image["ROUGE-L"],
                                         meteor=image["meteor"]))
        nltk = metrics.nltk_bleu4([[r.split() for r in refs[i]] for i in sorted(refs)],
                                  [hyps[i].split() for i in sorted(refs)])
        out[name] = rows, {**scores[name], "nltk BLEU-4": nltk}
    return out


@pytest.mark.parametrize("system", ["noise", "copy", "mixed"])
def test_on_all_images_the_summed_statistics_give_the_corpus_scores(scored, system):
    """BLEU-1..4 (coco-caption's, with its constants and its closest reference length), nltk's BLEU-4 and
    METEOR exactly, CIDEr-D and ROUGE-L up to the order of a floating-point sum."""
    rows, scores = scored[system]
    draws = significance.replicates(rows, list(significance.MEASURES), significance.resample_counts(len(rows), 100))
    for name in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "nltk BLEU-4"):
        assert draws[name][0] == scores[name], name
    assert draws["CIDEr"][0] == pytest.approx(scores["CIDEr"], rel=1e-12)
    assert draws["ROUGE-L"][0] == pytest.approx(scores["ROUGE-L"], rel=1e-12)
    if metrics.java_available():
        assert draws["METEOR"][0] == pytest.approx(scores["METEOR"], rel=1e-12)
    else:
        assert "METEOR" not in draws  # no Java, no METEOR statistics


def test_meteor_from_its_statistics_by_hand():
    """Two captions' statistics as the Java scorer printed them ("a man riding a horse" against "a man
    riding a horse", "a blue car on a street" against "a red bus on the street"): each one's score, and
    the corpus score, where the perfect caption's chunk is not summed; the Java scorer gave the same."""
    perfect = [5.0, 5.0, 2.0, 2.0, 3.0, 3.0, 2.0, 2.0] + [0.0] * 12 + [1.0, 5.0, 5.0]
    partial = [6.0, 6.0, 3.0, 3.0, 0.0, 0.0, 2.0, 2.0] + [0.0] * 8 + [1.0, 1.0, 1.0, 1.0, 2.0, 4.0, 4.0]
    assert metrics.meteor_from_sums(perfect) == 1.0
    assert metrics.meteor_from_sums(partial) == pytest.approx(0.17514554274151933, abs=1e-15)
    total = [a + b for a, b in zip(metrics.meteor_vector(perfect), metrics.meteor_vector(partial), strict=True)]
    assert total[20] == 2.0  # the partial caption's chunks only
    assert metrics.meteor_from_sums(total) == pytest.approx(0.3721921501059742, abs=1e-15)
    assert metrics.meteor_from_sums([0.0] * 23) == 0.0


def test_resample_counts_are_seeded_draws_of_every_image():
    counts = significance.resample_counts(50, 200, seed=3)
    assert counts.shape == (200, 50) and (counts.sum(axis=1) == 50).all()
    assert np.array_equal(counts, significance.resample_counts(50, 200, seed=3))
    assert not np.array_equal(counts, significance.resample_counts(50, 200, seed=4))
    assert counts.mean() == pytest.approx(1.0) and 0.3 < (counts == 0).mean() < 0.45  # about 1/e never drawn


def test_a_run_against_itself_has_margin_zero_and_no_significance(scored):
    rows, _ = scored["mixed"]
    counts = significance.resample_counts(len(rows))
    draws = significance.replicates(rows, ["BLEU-4", "METEOR", "CIDEr", "exact_match"], counts)
    for name, draw in draws.items():
        interval = significance.margin([draw[0]], [draw[0]], [draw], [draw])
        assert (interval.difference, interval.low, interval.high, interval.p) == (0.0, 0.0, 0.0, 1.0), name
        assert not interval.significant


def synthetic_rows(scores):
    return [results.ImageRow(k, k, "", float(s), False) for k, s in enumerate(scores)]


def test_image_bootstrap_covers_the_true_difference_95_percent_of_the_time():
    """Per-image scores with a known mean difference, drawn anew 200 times: the interval holds it in
    about 95% of the draws (3 binomial standard deviations: 90.4% to 99.6%)."""
    rng, covered, draws, delta = np.random.default_rng(0), 0, 200, 0.3
    for d in range(draws):
        a = rng.normal(5.0, 1.0, 300)
        b = a + delta + rng.normal(0.0, 0.8, 300)  # paired: the same images, scored by two models
        counts = significance.resample_counts(300, seed=d)
        ra, rb = (significance.replicates(synthetic_rows(x), ["CIDEr"], counts)["CIDEr"] for x in (a, b))
        interval = significance.margin([ra[0]], [rb[0]], [ra], [rb])
        covered += interval.low <= delta <= interval.high
    assert 0.904 <= covered / draws <= 0.996, covered / draws


def test_seed_interval_covers_the_true_difference_95_percent_of_the_time():
    """Three seeds per configuration, each seed moving the whole run (sd 0.15) and every image scored
    with noise: the Welch interval with the image bootstrap's variance holds the configurations' true
    difference in about 95% of 200 draws."""
    rng, covered, draws, delta, images = np.random.default_rng(1), 0, 200, 0.2, 200
    for d in range(draws):
        image_effect = rng.normal(0.0, 1.0, images)  # the same test images for every run
        counts = significance.resample_counts(images, 500, seed=d)
        sides = []
        for mean in (5.0, 5.0 + delta):
            runs = [mean + rng.normal(0.0, 0.15) + image_effect + rng.normal(0.0, 0.5, images) for _ in range(3)]
            sides.append([significance.replicates(synthetic_rows(r), ["CIDEr"], counts)["CIDEr"] for r in runs])
        (a, b) = sides
        interval = significance.margin([x[0] for x in a], [x[0] for x in b], a, b)
        assert interval.method == "seeds"
        covered += interval.low <= delta <= interval.high
    assert 0.904 <= covered / draws <= 0.996, covered / draws


def test_the_same_seed_gives_the_same_interval_and_holm_by_hand(scored):
    intervals = []
    for seed in (7, 7, 8):
        counts = significance.resample_counts(len(scored["noise"][0]), seed=seed)
        a, b = (significance.replicates(scored[s][0], ["CIDEr"], counts)["CIDEr"] for s in ("noise", "mixed"))
        intervals.append(significance.margin([a[0]], [b[0]], [a], [b]))
    assert intervals[0] == intervals[1] != intervals[2] and intervals[0].significant
    assert significance.holm([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.09, 0.09, 0.5])


# ----------------------------------------------------------------------------- compare.py on made-up runs

def fake_run(folder, seed=42, decoder="attention", shift=0.0, images=60, data_name="shapes_x", **config):
    """A run folder as train.py and eval.py leave it, with made-up per-image results at beam 3: each
    image's CIDEr and exact match move with `shift`, and the seed moves them a little."""
    rng = np.random.default_rng(seed + 1000 * int(shift * 100))
    folder.mkdir(parents=True)
    cfg = {**default_config(), "decoder": decoder, "seed": seed, "out": str(folder), "data_name": data_name, **config}
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
        [{"kind": "step", "step": s, "loss": 2.0 / s + rng.normal(0, 0.01)} for s in (1, 2, 3)]
        + [{"kind": "epoch", "epoch": e, "best": True, "val_loss": 1.0 / e, "val_bleu4": 0.1 * e, "val_top5": 0.9,
            "images_per_s": 100.0, "epoch_time_s": 1.0, "peak_memory_mb": 10.0} for e in (1, 2)])))
    rows = []
    for k in range(images):
        words = 5 + k % 4
        correct = [max(0, min(words - n, int(words * (0.5 + shift) + rng.integers(-1, 2)) - n)) for n in range(4)]
        rows.append(results.ImageRow(k, k, "a caption", float(np.clip(rng.normal(4 + 2 * shift, 1), 0, 10)),
                                     bool(rng.random() < 0.4 + shift), bleu={
                                         "hyp_len": words, "ref_len": words + 1, "guess": [words - n for n in range(4)],
                                         "correct": correct}, ROUGE_L=float(rng.uniform(0.5, 1)),
                                     nltk_bleu={"hyp_len": words, "ref_len": words,
                                                "guess": [max(1, words - n) for n in range(4)], "correct": correct}))
    draws = significance.replicates(rows, QUALITY, significance.resample_counts(images, 100))
    res = results.EvalResults(str(folder / "best.pt"), f"w{seed}{decoder}{shift}", 2, "TEST", images, "data/none",
                              data_name, decoder, 1000, {"kind": "raw", "per_image_min": 5, "per_image_max": 5,
                                                         "per_image_mean": 5.0}, cfg, format=results.FORMAT)
    captions_file, images_file = results.file_names("eval_TEST.json", 3)
    res.beams[3] = results.BeamResult(3, {k: v[0] for k, v in draws.items()}, 50.0, 1.0, 30, 0.0, 0, captions_file,
                                      images_file)
    results.write(folder / "eval_TEST.json", res, {3: []}, {3: results.ImageTable("TEST", 3, None, rows)})
    return folder


def test_groups_give_mean_sd_seeds_and_intervals_in_report_and_json(tmp_path, monkeypatch, capsys):
    rnn = [fake_run(tmp_path / f"rnn-s{s}", seed=s, decoder="rnn") for s in (1, 2, 3)]
    att = [fake_run(tmp_path / f"att-s{s}", seed=s, shift=0.2) for s in (1, 2, 3)]
    out = tmp_path / "report"
    code, err = run_main(compare, ["--group", "rnn", *rnn, "--group", "attention", *att, "--out", out],
                         monkeypatch, capsys)
    assert code == 0, err
    data = json.loads((out / "comparison.json").read_text())
    assert data["bootstrap"] == {"resamples": 1000, "seed": 0, "confidence": 0.95} and set(data["methods"]) == {"seeds"}
    (group,) = [g for g in data["groups"] if g["name"] == "attention"]
    assert [r["seed"] for r in group["runs"]] == [1, 2, 3]
    values = [json.loads((run / "eval_TEST.json").read_text())["results"]["beam3"]["CIDEr"] for run in att]
    cider = group["metrics"]["beam3"]["CIDEr"]
    assert cider["values"] == values and cider["mean"] == pytest.approx(np.mean(values))
    assert cider["sd"] == pytest.approx(np.std(values, ddof=1))
    (margin,) = [m for m in data["margins"] if m["measure"] == "CIDEr"]
    assert (margin["a"], margin["b"], margin["method"]) == ("rnn", "attention", "seeds")
    means = {g["name"]: g["metrics"]["beam3"]["CIDEr"]["mean"] for g in data["groups"]}
    assert margin["difference"] == pytest.approx(means["attention"] - means["rnn"])
    assert margin["low"] < margin["difference"] < margin["high"] and margin["significant"] == (margin["low"] > 0)
    loss = [m for m in data["margins"] if m["measure"] == "val_loss"][0]
    assert loss["low"] is None and loss["p"] is None and not loss["significant"]
    report = (out / "report.md").read_text()
    assert f"{cider['mean']:.4f} ± {cider['sd']:.4f}" in report and "· att-s2 (seed 2)" in report
    assert "Welch t-intervals" in report and "### attention - rnn" in report
    assert "- **attention (attention, 3 seeds)** beats **rnn (rnn, 3 seeds)** on" in report
    # a note made while the sections rendered (the made-up data cannot be read) reaches report.md
    assert "Note: the evaluated data cannot be read" in report
    assert (out / "curves.png").stat().st_size > 1000 and (out / "metrics.png").stat().st_size > 1000


def test_single_runs_say_the_interval_covers_the_images_only(tmp_path, monkeypatch, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", shift=0.3)
    code, err = run_main(compare, [a, b, "--out", tmp_path / "r"], monkeypatch, capsys)
    assert code == 0, err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "these intervals cover which test images were drawn, not which training run" in report
    assert "paired bootstrap over the 60 TEST images (1000 resamples, seed 0)" in report
    data = json.loads((tmp_path / "r" / "comparison.json").read_text())
    assert {m["method"] for m in data["margins"] if m["p"] is not None} == {"images"}
    assert data["groups"][0]["metrics"]["beam3"]["CIDEr"].keys() == {"value"}


@pytest.mark.parametrize("change,named", [({"decoder": "rnn"}, "decoder"), ({"decoder_dim": 64}, "decoder_dim"),
                                          ({"data_name": "other"}, "data_name"), ({"seed": 1}, "both have seed 1")])
def test_a_group_of_runs_that_differ_in_more_than_the_seed_is_refused(tmp_path, monkeypatch, capsys, change, named):
    first = fake_run(tmp_path / "one", seed=1)
    other = fake_run(tmp_path / "two", **{"seed": 2, **change})
    out = tmp_path / "r"
    code, err = run_main(compare, [fake_run(tmp_path / "base", decoder="rnn"), "--group", "g", first, other,
                                   "--out", out], monkeypatch, capsys)
    assert code == 2 and named in err and "group g" in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    # the run folder, workers, device and logging may differ, and a group of one run is allowed
    ok = fake_run(tmp_path / "three", seed=3, workers=7, device="cpu", log_every=1)
    code, err = run_main(compare, ["--group", "one", first, ok, "--group", "alone", tmp_path / "base",
                                   "--out", out], monkeypatch, capsys)
    assert code == 0, err


def test_runs_scored_on_different_data_are_refused_in_either_order(tmp_path, monkeypatch, capsys):
    mine, demo = fake_run(tmp_path / "mine", data_name="mine_5_cap"), fake_run(tmp_path / "demo", decoder="rnn")
    for runs in ((demo, mine), (mine, demo)):
        out = tmp_path / f"r-{runs[0].name}"
        code, err = run_main(compare, [*runs, "--out", out], monkeypatch, capsys)
        assert code == 2 and "mine_5_cap" in err and "shapes_x" in err and "same split of the same data" in err
        assert not out.exists()


def test_results_of_an_older_eval_say_evaluate_again(tmp_path, monkeypatch, capsys):
    a, b = fake_run(tmp_path / "a"), fake_run(tmp_path / "b", shift=0.3)
    table = b / "eval_TEST_images_beam3.json"
    data = json.loads(table.read_text())
    for row in data["images"]:
        del row["bleu"]
    table.write_text(json.dumps(data))
    code, err = run_main(compare, [a, b, "--out", tmp_path / "r"], monkeypatch, capsys)
    assert code == 0, err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "b: its beam-3 results have no per-image statistics (an older eval.py)" in report
    assert f"evaluate again with `python eval.py --checkpoint {b / 'best.pt'} --beam-size 3`" in report
    assert "(no interval: evaluate again)" in report
