"""eval.py end to end on tiny trained checkpoints."""
import base64
import json
import math
import shutil

import pytest
import torch
from PIL import Image

import significance
from models import DECODERS
from results import ImageRow
from tests.helpers import copy_data, refused, run_script



@pytest.mark.parametrize("decoder", DECODERS)
def test_eval(trained, tmp_path, decoder):
    out = tmp_path / "res" / "eval.json"
    r = run_script("eval.py", "--checkpoint", trained(decoder), "--beam-size", 1, 3, "--out", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["images"] == 6 and report["split"] == "TEST" and report["decoder"] == decoder
    for k in (1, 3):
        res = report["results"][f"beam{k}"]
        for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "nltk BLEU-4"):
            assert 0 <= res[metric] <= 10
        assert res["images_per_s"] > 0
        assert ("pointing" in res) == (decoder != "rnn")  # the decoders with maps
        captions = json.loads((out.parent / res["captions_file"]).read_text())
        assert sorted(c["image_id"] for c in captions) == list(range(6))
        assert all(isinstance(c["caption"], str) and "<end>" not in c["caption"] for c in captions)
        check_per_image(json.loads((out.parent / res["images_file"]).read_text()), captions, res, decoder)
    assert "BLEU-4" in r.stdout and "CIDEr" in r.stdout
    assert "0 counts" not in r.stdout + r.stderr  # nltk's warning about short captions is not printed
    assert report["weights"] and report["decoder_parameters"] == sum(
        v.numel() for v in torch.load(trained(decoder), weights_only=True)["decoder"].values())
    # shapes images have 6 captions, 5 of them encoded: coco-caption used all 6
    assert report["references"] == {"kind": "raw", "per_image_min": 6, "per_image_max": 6, "per_image_mean": 6.0}
    assert report["nltk_bleu4_references"] == "encoded" and "against the raw references" in r.stdout


def check_per_image(table, captions, res, decoder):
    """eval.py's per-image file agrees with its captions file and its corpus numbers."""
    rows = table["images"]
    assert [r["caption"] for r in rows] == [c["caption"] for c in captions]
    assert [r["index"] for r in rows] == list(range(6)) and table["beam_size"] in (1, 3)
    assert sum(r["CIDEr"] for r in rows) / 6 == pytest.approx(res["CIDEr"], abs=1e-9)
    assert sum(r["exact_match"] for r in rows) / 6 == pytest.approx(res["exact_match"])
    assert all(r["describes_scene"] == (not any(r["scene_errors"].values())) for r in rows)
    # every corpus number comes back from the per-image statistics eval.py kept (what compare.py resamples)
    draws = significance.replicates([ImageRow(**r) for r in rows], list(significance.MEASURES),
                                    significance.resample_counts(6, 10))
    for name, (value, _) in draws.items():  # a ratio with nothing to count (no relation stated) is NaN, None in res
        assert math.isnan(value) if res.get(name) is None else value == pytest.approx(res[name], rel=1e-12), name
    assert {"BLEU-4", "nltk BLEU-4", "CIDEr", "ROUGE-L", "exact_match"} <= set(draws)
    if decoder == "rnn":
        assert table["attention_grid"] is None and not any("attention" in r or "pointing" in r for r in rows)
        return
    grid = table["attention_grid"]
    assert grid == 4  # the TINY encoder's grid
    counted = [p for r in rows for p in r["pointing"] if p is not None]
    assert len(counted) == res["pointing_words"] and sum(counted) / len(counted) == pytest.approx(res["pointing"])
    # attention mass: over the same words as pointing, with the same chance level; colour and shape words apart
    assert sum(r["attention_mass"]["attention_mass"][2] for r in rows) == len(counted)
    assert res["attention_mass_chance"] == pytest.approx(res["pointing_chance"])
    assert all(r["attention_mass"]["attention_mass_colour"][2] + r["attention_mass"]["attention_mass_shape"][2]
               == r["attention_mass"]["attention_mass"][2] for r in rows)
    layers = [res.get(f"attention_mass_layer{n}") for n in (1, 2, 3)]
    if decoder == "transformer":  # 2 layers (TINY): the mass is linear in the map, so the mean's is the layers' mean
        assert layers[2] is None and res["attention_mass"] == pytest.approx((layers[0] + layers[1]) / 2)
    else:
        assert layers == [None] * 3
    for r in rows:
        maps = base64.b64decode(r["attention"])
        assert len(maps) == len(r["caption"].split()) * grid * grid == len(r["pointing"]) * grid * grid
        assert all(max(maps[k:k + grid * grid]) == 255 for k in range(0, len(maps), grid * grid))


def test_eval_without_a_references_file_uses_the_encoded_ones(trained, shapes_data, tmp_path):
    """Data prepared elsewhere (the tutorial) has no REFS file: eval says so and scores against the
    encoded references; nltk BLEU-4 is the same either way."""
    data = tmp_path / "data"
    shutil.copytree(shapes_data, data, ignore=shutil.ignore_patterns("*_REFS_*", "cache"))
    runs = {}
    for name, folder in (("raw", shapes_data), ("encoded", data)):
        out = tmp_path / name / "eval.json"
        r = run_script("eval.py", "--checkpoint", trained("rnn"), "--beam-size", 1, "--data-folder", folder,
                       "--out", out)
        assert r.returncode == 0, r.stderr
        runs[name] = json.loads(out.read_text())
        assert ("note: no TEST_REFS file" in r.stdout) == (name == "encoded")
    assert runs["encoded"]["references"]["kind"] == "encoded" and runs["encoded"]["references"]["per_image_max"] == 5
    raw, encoded = runs["raw"]["results"]["beam1"], runs["encoded"]["results"]["beam1"]
    assert raw["nltk BLEU-4"] == encoded["nltk BLEU-4"] and raw["CIDEr"] != encoded["CIDEr"]


def test_eval_decoding_benchmark(trained):
    r = run_script("eval.py", "--checkpoint", trained("attention"), "--benchmark-decoding", 6, "--beam-size", 3)
    assert r.returncode == 0, r.stderr
    assert "True" in r.stdout.splitlines()[-1]  # batched and one-at-a-time captions agree
    assert "6 images, the median of 3 runs after a warm-up (lowest-highest)" in r.stdout


def test_other_processes_cpu_use_is_measured_and_marks_a_busy_figure(monkeypatch):
    """hardware.OtherLoad: the machine's busy CPU seconds less this process's, over the wall time."""
    import hardware
    with hardware.OtherLoad() as real:  # Linux: read from /proc/stat
        sum(range(10**5))
    assert real.cores is not None and real.cores >= 0
    readings, clock = iter([(100.0, 10.0), (104.0, 11.0)]), iter([5.0, 7.0])
    monkeypatch.setattr(hardware, "_cpu_seconds", lambda: next(readings))
    monkeypatch.setattr(hardware.time, "perf_counter", lambda: next(clock))
    with hardware.OtherLoad() as load:  # the machine was busy 4 s, this process 1 s, in 2 s: 1.5 cores others'
        pass
    assert load.cores == 1.5 and load.note == " (busy: other processes used 1.5 cores)"
    assert hardware.busy_note(None) == hardware.busy_note(hardware.BUSY_CORES) == ""


def test_a_tutorial_checkpoint_is_named_as_such(tmp_path):
    """sgrvinod's tutorial pickles whole models: say what the file is, without torch's colour codes."""

    import models
    cls = type("DecoderWithAttention", (torch.nn.Module,), {"__module__": "models"})
    models.DecoderWithAttention = cls  # where the tutorial's class lives, so that pickle can name it
    try:
        torch.save({"epoch": 3, "decoder": cls(), "bleu-4": 0.2}, tmp_path / "BEST_checkpoint.pth.tar")
    finally:
        del models.DecoderWithAttention
    (tmp_path / "in").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "in" / "a.png")
    for r in (run_script("caption.py", "--checkpoint", tmp_path / "BEST_checkpoint.pth.tar", "--folder",
                         tmp_path / "in"),
              run_script("eval.py", "--checkpoint", tmp_path / "BEST_checkpoint.pth.tar")):
        assert r.returncode == 2
        (line,) = r.stderr.splitlines()
        assert "pickled model objects (models.DecoderWithAttention)" in line and "tutorial" in line
        assert "train here" in line and "\x1b" not in line


def test_eval_split_not_prepared_and_other_vocabulary(trained, tmp_path, shapes_data):
    ckpt = trained("rnn")
    copy_data(shapes_data, tmp_path / "data")
    for f in (tmp_path / "data").glob("VAL_*"):
        f.unlink()
    refused(run_script("eval.py", "--checkpoint", ckpt, "--split", "VAL", "--data_folder", tmp_path / "data"),
            "VAL", "not prepared")
    refused(run_script("eval.py", "--checkpoint", ckpt, "--data_folder", tmp_path), "WORDMAP")
    refused(run_script("eval.py", "--checkpoint", ckpt, "--beam-size", 0), "beam")
    assert not list(ckpt.parent.glob("eval_*"))


def test_a_later_eval_keeps_the_earlier_beams_and_says_what_it_replaced(trained, tmp_path):
    """Beams 1 and 3, then beam 1 again: beam 3's results and per-image file (with its maps) stay, beam 1's
    are replaced, and one line says so. Another checkpoint replaces everything, also said in one line."""
    run = tmp_path / "run"
    shutil.copytree(trained("attention").parent, run)
    r = run_script("eval.py", "--checkpoint", run / "best.pt", "--beam-size", 1, 3)
    assert r.returncode == 0, r.stderr
    first = json.loads((run / "eval_TEST.json").read_text())
    beam3 = (run / "eval_TEST_images_beam3.json").read_bytes()
    r = run_script("eval.py", "--checkpoint", run / "best.pt", "--beam-size", 1, "--max-len", 2)
    assert r.returncode == 0, r.stderr
    (line,) = [ln for ln in r.stdout.splitlines() if "replaced" in ln]
    assert "replaced the earlier results of beam 1; kept beam 3" in line
    second = json.loads((run / "eval_TEST.json").read_text())
    assert list(second["results"]) == ["beam1", "beam3"]
    assert second["results"]["beam3"] == first["results"]["beam3"]
    assert second["results"]["beam1"]["max_len"] == 2 and first["results"]["beam1"]["max_len"] == 20
    assert (run / "eval_TEST_images_beam3.json").read_bytes() == beam3
    assert "attention" in json.loads(beam3)["images"][0]
    shutil.copy(trained("rnn"), run / "best.pt")  # another model in the same place
    r = run_script("eval.py", "--checkpoint", run / "best.pt", "--beam-size", 5)
    assert r.returncode == 0, r.stderr
    assert "replaced the earlier results (beam 1, 3," in r.stdout and "another checkpoint" in r.stdout
    assert list(json.loads((run / "eval_TEST.json").read_text())["results"]) == ["beam5"]
    (run / "eval_TEST.json").write_text("{broken")
    refused(run_script("eval.py", "--checkpoint", run / "best.pt", "--beam-size", 1), "eval_TEST.json",
            "not valid JSON")


@pytest.mark.parametrize("argv, said", [
    (["--beam-size", "3", "0"], "argument --beam-size: must be at least 1, got 0"),
    (["--beam-size", "two"], "argument --beam-size: must be an integer, got 'two'"),
    (["--length-penalty", "-1"], "argument --length-penalty: must be at least 0, got -1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0")])
def test_a_bad_option_is_one_line_naming_it(monkeypatch, capsys, argv, said):
    import importlib
    ev = importlib.import_module("eval")
    monkeypatch.setattr("sys.argv", ["eval.py", "--checkpoint", "best.pt", *argv])
    with pytest.raises(SystemExit) as e:
        ev.parse_args()
    assert e.value.code == 2 and capsys.readouterr().err == f"eval.py: error: {said} (--help lists the options)\n"


def test_a_run_folder_is_its_best_checkpoint_and_a_folder_without_one_is_said(tmp_path, capsys):
    from checkpoint import load_checkpoint
    from utils import InputError, checkpoint_file
    assert checkpoint_file(str(tmp_path)) == str(tmp_path)  # no best.pt: load_checkpoint says what to pass
    with pytest.raises(InputError, match="is a folder: pass one of its checkpoints"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "best.pt").touch()
    assert checkpoint_file(str(tmp_path)) == str(tmp_path / "best.pt")
    assert capsys.readouterr().out == f"{tmp_path} is a run folder: using its best.pt\n"
