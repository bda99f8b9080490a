"""results.py: eval results written and read back as they were, and merged by beam size."""
from dataclasses import replace

import pytest

import results
from utils import InputError


def beam(k, cider):
    captions_file, images_file = results.file_names("eval_TEST.json", k)
    return results.BeamResult(k, {"CIDEr": cider, "METEOR": None}, 100.0, 1.0, 20, 0.0, 0, captions_file, images_file)


def evaluation(weights="abc", beams=(1, 3), images=6):
    return results.EvalResults("/runs/a/best.pt", weights, 8, "TEST", images, "data/shapes", "shapes_x", "attention",
                               1234, {"kind": "raw", "per_image_min": 6, "per_image_max": 6, "per_image_mean": 6.0},
                               {"decoder": "attention"}, {k: beam(k, float(k)) for k in beams})


def test_results_and_tables_round_trip(tmp_path):
    res = evaluation()
    res.beams[3] = replace(res.beams[3], others_cores=1.2)  # decoded while other processes took 1.2 cores
    rows = [results.ImageRow(0, 0, "a red circle", 1.5, True, True, {"missing": [], "invented": [], "false": []},
                             [None, 1, 0], "AAAA"), results.ImageRow(1, "b.jpg", "", 0.0, False)]
    path = tmp_path / "eval_TEST.json"
    results.write(path, res, {1: [{"image_id": 0, "caption": "a red circle"}]},
                  {1: results.ImageTable("TEST", 1, 2, rows)})
    back = results.read_results(path)
    assert back == res and list(back.beams) == [1, 3] and [b.others_cores for b in back.beams.values()] == [None, 1.2]
    table = results.read_table(path, back.beams[1])
    assert table.rows == rows and table.attention_grid == 2 and not table.has_maps
    assert [r.right for r in rows] == [True, False]  # the scene where there is one, else the exact match
    assert results.read_table(path, back.beams[3]) is None  # its file was never written
    assert results.read_results(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(InputError, match="bad.json is not valid JSON"):
        results.read_results(tmp_path / "bad.json")


def test_merge_keeps_the_beams_not_recomputed():
    old, new = evaluation(beams=(1, 3, 5)), evaluation(beams=(1,))
    new.beams[1] = beam(1, 9.0)
    merged, said = results.merge(old, new)
    assert list(merged.beams) == [1, 3, 5] and merged.beams[1].metrics["CIDEr"] == 9.0
    assert merged.beams[3] == old.beams[3]
    assert said == "replaced the earlier results of beam 1; kept beam 3, 5"
    merged, said = results.merge(evaluation(beams=(3,)), new)
    assert list(merged.beams) == [1, 3] and said is None  # nothing replaced, nothing to say
    assert results.merge(None, new) == (new, None)


@pytest.mark.parametrize("change,why", [({"weights": "other"}, "another checkpoint"), ({"images": 3}, "other images"),
                                        ({"weights": None}, "an older eval.py")])
def test_merge_replaces_the_results_of_another_model_or_other_images(change, why):
    old = replace(evaluation(beams=(3, 5)), **change)
    merged, said = results.merge(old, evaluation(beams=(1,)))
    assert list(merged.beams) == [1] and why in said and "beam 3, 5" in said


def test_the_makefile_evaluates_again_when_the_format_changes():
    """make remakes an evaluation whose stamp of the current format is missing: its EVAL_FORMAT is results.FORMAT."""
    import re

    from tests.helpers import ROOT
    with open(f"{ROOT}/Makefile") as f:
        assert int(re.search(r"^EVAL_FORMAT := (\d+)$", f.read(), re.M).group(1)) == results.FORMAT


def test_an_older_format_is_replaced_whole_and_says_why():
    old = replace(evaluation(beams=(3, 5)), format=1)
    merged, said = results.merge(old, replace(evaluation(beams=(1,)), format=results.FORMAT))
    assert list(merged.beams) == [1] and "without the per-image statistics" in said
