"""compare.py: the shortened demo (trained runs -> eval -> the report), what it says of each run, the
self-critical section, and what it says when a run lacks the beam size asked for or its maps."""
import json
import re
import shutil

import pytest
import yaml

from tests.helpers import page_data, refused, run_main, run_script, train_args



def tables_under(report, heading):
    """The pipe tables of one section (## or ###) of a report, each as {row label: {column: cell}}."""
    text = report.split(f"{heading}\n", 1)[1]
    text = re.split(r"\n#{2,3} ", text, maxsplit=1)[0]
    tables = []
    for block in re.findall(r"((?:^\|.*\|\n)+)", text, re.M):
        rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in block.strip().splitlines()]
        tables.append({row[0]: dict(zip(rows[0][1:], row[1:], strict=True)) for row in rows[2:]})
    return tables


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    """Both tiny decoders copied and evaluated at beam 1 and 3."""
    root = tmp_path_factory.mktemp("compare")
    runs = []
    for decoder in ("rnn", "attention"):
        run = root / decoder
        shutil.copytree(trained(decoder).parent, run)
        r = run_script("eval.py", "--checkpoint", run / "best.pt", "--beam-size", 1, 3)
        assert r.returncode == 0, r.stderr
        runs.append(run)
    return runs


def test_shortened_demo_report(evaluated, tmp_path, shapes_data):
    runs = evaluated
    # a third run that stopped early and was never evaluated
    stopped = tmp_path / "stopped"
    r = run_script("train.py", *train_args(stopped, shapes_data, decoder="attention", epochs=5, patience=1,
                                           decoder_lr=1e-12))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "report"
    r = run_script("compare.py", *runs, stopped, "--out", out)
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    for beam in (1, 3):  # every cell of the quality table is the eval result of its run and metric
        (cells,) = tables_under(report, f"### beam {beam}")
        for run in runs:
            results = json.loads((run / "eval_TEST.json").read_text())["results"][f"beam{beam}"]
            row = cells[f"{run.name} ({run.name})"]
            for metric in ("BLEU-4", "CIDEr", "ROUGE-L", "nltk BLEU-4"):
                assert row[metric] == f"{results[metric]:.4f}", (run.name, beam, metric)
            assert row["exact match"] == f"{results['exact_match']:.1%}"
        assert cells["stopped (attention)"]["CIDEr"] == "n/a"
    # the margin at beam 3, with its interval, is the one comparison.json holds, and the difference of the two
    (margins,) = tables_under(report, "### attention - rnn")
    data = json.loads((out / "comparison.json").read_text())
    (cider,) = [m for m in data["margins"] if m["measure"] == "CIDEr" and m["beam"] == 3]
    cell = margins["CIDEr"]["attention - rnn [95% interval]"]
    assert cell.strip("*") == f"{cider['difference']:+.4f} [{cider['low']:+.4f}, {cider['high']:+.4f}]"
    assert cell.startswith("**") == cider["significant"] and cider["low"] <= cider["difference"] <= cider["high"]
    scored = [json.loads((run / "eval_TEST.json").read_text())["results"]["beam3"]["CIDEr"] for run in runs]
    assert cider["difference"] == pytest.approx(scored[1] - scored[0], abs=1e-12)
    assert "**stopped (attention): no eval results yet**" in report
    assert "stopped (attention) stopped early after 2 of 5 epochs" in report
    (cost,) = tables_under(report, "## Cost")
    parameters = json.loads((runs[1] / "eval_TEST.json").read_text())["decoder_parameters"]
    assert cost["attention (attention)"]["decoder parameters"] == f"{parameters / 1e6:.2f} M"
    for png in ("curves.png", "metrics.png", "attention.png"):
        assert (out / png).stat().st_size > 1000
    # the errors table marks as wrong exactly the captions eval.py's per-image files call wrong
    rows = {run.name: json.loads((run / "eval_TEST_images_beam3.json").read_text())["images"] for run in runs}
    if "## Typical errors" in report:
        (errors,) = tables_under(report, "## Typical errors")
        for image, cells in errors.items():
            index = int(image.split()[1])
            for name in ("rnn", "attention"):
                row = rows[name][index]
                assert cells[name] == (row["caption"] if row["describes_scene"] else f"*{row['caption']}*")
    page = (out / "report.html").read_text()
    data = page_data(page)
    assert [r["name"] for r in data["runs"]] == ["rnn", "attention"] and len(data["images"]) == 6
    assert data["runs"][1]["grid"] == 4 and data["runs"][0]["grid"] is None  # the attention run's 4x4 maps
    for k, name in enumerate(("rnn", "attention")):  # the beam-3 captions and CIDEr eval.py kept
        assert [im["caps"][k]["caption"] for im in data["images"]] == [r["caption"] for r in rows[name]]
        assert [im["caps"][k]["CIDEr"] for im in data["images"]] == [r["CIDEr"] for r in rows[name]]
        assert [im["caps"][k]["right"] for im in data["images"]] == [r["describes_scene"] for r in rows[name]]
    assert "Browse the 6 TEST images" in page and "[report.html](report.html#browse)" in report
    r = run_script("compare.py", *runs, "--out", tmp_path / "first4", "--browse-images", 4, "--thumb-size", 32)
    assert r.returncode == 0, r.stderr
    assert "Browse the 4 TEST images" in (tmp_path / "first4" / "report.html").read_text()
    assert "a browser of the first 4 TEST images" in (tmp_path / "first4" / "report.md").read_text()


def test_a_missing_beam_size_or_missing_maps_is_said(evaluated, tmp_path):
    """--beam-size 5 when the runs have 1 and 3: the report uses 1 and says so; an attention run whose
    per-image file has no maps gets the command to run, and no per-image file means no browser."""
    runs = [tmp_path / run.name for run in evaluated]
    for src, run in zip(evaluated, runs, strict=True):
        shutil.copytree(src, run)
    r = run_script("compare.py", *runs, "--out", tmp_path / "r5", "--beam-size", 5)
    assert r.returncode == 0, r.stderr
    note = "rnn, attention: no beam 5 results, so the figures, errors and browser use beam 1"
    assert note in r.stdout and note in (tmp_path / "r5" / "report.md").read_text()
    table = runs[1] / "eval_TEST_images_beam3.json"
    data = json.loads(table.read_text())
    for row in data["images"]:
        del row["attention"]
    table.write_text(json.dumps(data))
    r = run_script("compare.py", *runs, "--out", tmp_path / "r3")
    assert r.returncode == 0, r.stderr
    assert "attention: its beam-3 results have no attention maps" in r.stdout
    command = f"python eval.py --checkpoint {runs[1] / 'best.pt'} --beam-size 3"
    assert command in (tmp_path / "r3" / "report.md").read_text()
    for f in runs[0].glob("eval_TEST_images_*.json"):
        f.unlink()
    r = run_script("compare.py", *runs, "--out", tmp_path / "r3")
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "r3" / "report.md").read_text()
    assert "No browser of the TEST images in report.html: rnn: no per-image results at beam 3: evaluate again" in report
    assert 'id="data"' not in (tmp_path / "r3" / "report.html").read_text()


def test_report_says_what_self_critical_training_changed(trained, scst_run, tmp_path):
    """compare.py pairs an scst run with the run its --init_from names, and says what changed."""
    xe, scst = tmp_path / "xe", tmp_path / "scst"
    shutil.copytree(trained("attention").parent, xe)
    shutil.copytree(scst_run, scst)
    cfg = yaml.safe_load((scst / "config.yaml").read_text())
    (scst / "config.yaml").write_text(yaml.safe_dump({**cfg, "init_from": str(xe / "best.pt")}))
    for folder in (xe, scst):
        r = run_script("eval.py", "--checkpoint", folder / "best.pt", "--beam-size", 1, "--workers", 0)
        assert r.returncode == 0, r.stderr
    r = run_script("compare.py", xe, scst, "--out", tmp_path / "report", "--beam-size", 1, "--images", 2)
    assert r.returncode == 0, r.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## What self-critical training changed" in report and "xe -> scst" in report
    (changes,) = tables_under(report.split("## What self-critical training changed")[1], "### beam 1")
    before = json.loads((xe / "eval_TEST.json").read_text())["results"]["beam1"]["CIDEr"]
    after = json.loads((scst / "eval_TEST.json").read_text())["results"]["beam1"]["CIDEr"]
    assert changes["CIDEr"]["xe -> scst"].startswith(f"{before:.4f} -> {after:.4f}")
    assert "caption length" in changes and "The template that moved most" in report
    assert (tmp_path / "report" / "scst_curves.png").stat().st_size > 10000


def test_compare_refuses_a_folder_without_a_run(trained, tmp_path):
    refused(run_script("compare.py", trained("rnn").parent, tmp_path, "--out", tmp_path / "r"), "config.yaml")


def test_three_decoders_side_by_side(evaluated, trained, tmp_path):
    """The Transformer beside the two LSTMs: its margins with intervals, its maps in the browser and in
    attention.png, asked of its decoder class (it returns maps) rather than of its name."""
    run = tmp_path / "transformer"
    shutil.copytree(trained("transformer").parent, run)
    assert run_script("eval.py", "--checkpoint", run / "best.pt", "--beam-size", 3).returncode == 0
    out = tmp_path / "report"
    r = run_script("compare.py", *evaluated, run, "--out", out, "--beam-size", 3, "--pair", "attention", "transformer")
    assert r.returncode == 0, r.stderr
    report = (out / "report.md").read_text()
    (margins,) = tables_under(report, "### transformer - attention")
    assert "transformer - attention [95% interval]" in margins["CIDEr"]
    # the attention mass beside pointing, with its chance level; the Transformer's per layer, compared with nothing
    assert "attention mass, layer 1" not in margins
    assert margins["attention mass"] and margins["attention mass, colour words"]
    beam3 = {row.split()[0]: cells for row, cells in tables_under(report, "### beam 3")[0].items()}
    assert "(chance" in beam3["transformer"]["attention mass"] and beam3["rnn"]["attention mass"] == "n/a"
    assert beam3["transformer"]["attention mass, layer 2"] != "n/a" and "It puts" in report
    data = page_data((out / "report.html").read_text())
    assert [(r["name"], r["grid"]) for r in data["runs"]] == [("rnn", None), ("attention", 4), ("transformer", 4)]
    assert (out / "attention.png").stat().st_size > 1000
    assert not (out / "maps_across.png").exists()  # two runs with maps: attention.png says it
    again = tmp_path / "again"  # a third run with maps: each run's maps of one image, one row per run
    shutil.copytree(evaluated[1], again)
    r = run_script("compare.py", *evaluated, run, again, "--out", tmp_path / "three", "--beam-size", 3,
                   "--pair", "attention", "transformer", "--pair", "attention", "again", "--pair", "rnn", "again")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "three" / "maps_across.png").stat().st_size > 1000
    report = (tmp_path / "three" / "report.md").read_text()
    assert "## The same image across the groups" in report
    # three pairs: an ablation's table, each margin corrected across the pairs
    (across,) = tables_under(report, "## Across the pairs at beam 3")
    assert list(across) == ["transformer - attention", "again - attention", "again - rnn"]
    assert across["again - attention"]["pointing"] == "+0.0 pts [+0.0, +0.0]"  # the same run twice
    assert across["again - rnn"]["pointing"] == "n/a" and across["again - rnn"]["CIDEr"].startswith(("+", "-", "**"))


def test_groups_say_what_is_wrong_and_name_one_thing_one_way(evaluated, trained, tmp_path, monkeypatch, capsys):
    """A pair of a group with itself, a group holding a run not yet evaluated, and a group mixing decoders
    are refused in one line that says what to do; a one-run group keeps its group's name throughout; a
    single run paired with a group of seeds says that it borrows the group's seed variance; a report of
    plain runs does not explain group rows."""
    import compare
    import eval as ev
    rnn, soft = evaluated
    tf = tmp_path / "demo-transformer"
    shutil.copytree(trained("transformer").parent, tf)
    assert run_main(ev, ["--checkpoint", tf / "best.pt", "--beam-size", 3], monkeypatch, capsys)[0] == 0
    unevaluated = tmp_path / "soft-s1"
    shutil.copytree(trained("attention").parent, unevaluated)
    seed1 = tmp_path / "soft-seed1"  # the same results as another seed: a group of two with no spread
    shutil.copytree(soft, seed1)
    cfg = yaml.safe_load((seed1 / "config.yaml").read_text())
    (seed1 / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": 1, "out": str(seed1)}))
    out = tmp_path / "report"
    for argv, said in (
            (["--group", "tf", tf, "--group", "soft", soft, "--pair", "soft", "soft"],
             "--pair soft soft pairs soft with itself: name two different groups or runs"),
            (["--group", "soft", soft, unevaluated, "--group", "tf", tf],
             f"group soft: {unevaluated} has no eval_TEST.json yet: run python eval.py --checkpoint "
             f"{unevaluated / 'best.pt'} on it first"),
            (["--group", "mixed", soft, tf, "--group", "plain", rnn], "differ in decoder ('attention' against "
                                                                      "'transformer')")):
        code, err = run_main(compare, [*argv, "--out", out], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and said in err, (argv, err)
        assert not out.exists()
    code, err = run_main(compare, ["--group", "tf", tf, "--group", "soft", soft, seed1, "--out", out, "--beam-size", 3],
                         monkeypatch, capsys)
    assert code == 0, err
    report = (out / "report.md").read_text()
    assert "demo-transformer (transformer)" not in report
    assert "**tf (transformer)**" in report and "### soft - tf" in report
    assert f"- **tf** is the run in {tf} (seed 42)." in report
    borrowed = "tf is one run: its seed-to-seed variance, which one run cannot show, is taken to be soft's (2 seeds)"
    assert report.count(borrowed) == 2  # in the summary and above the pair's margins
    assert "A group's row is the mean" in report
    code, err = run_main(compare, [rnn, soft, "--out", tmp_path / "plain", "--beam-size", 3], monkeypatch, capsys)
    plain = (tmp_path / "plain" / "report.md").read_text()
    assert code == 0 and "A group's row" not in plain and "is one run: its seed-to-seed" not in plain
