"""The docs pages whose commands use only what make demo made and make nothing another page uses
(tests/test_docs.py's STANDALONE), run as written in the same workspace, beside test_docs.py's pages."""
import json

import pytest

from tests.test_docs import STANDALONE, run_page


@pytest.mark.parametrize("page", STANDALONE)
def test_page_runs_as_written(demo_workspace, page):
    run_page(demo_workspace, page)


def test_the_own_data_example_made_what_it_says(demo_workspace):
    """data.md's worked example: its photos split as the page says, scored against raw references."""
    ws, name = demo_workspace, "mine_5_cap_per_img_0_min_word_freq"
    refs = [json.loads((ws / "data" / "mine" / f"{s}_REFS_{name}.json").read_text()) for s in ("TRAIN", "VAL", "TEST")]
    # 8 images without a split: 80/10/10 puts one each in VAL and TEST, beside coins.png and camera.png
    assert [len(x) for x in refs] == [6, 2, 2] and "camera.png" in [x["image_id"] for x in refs[2]]
    assert {"image_id": "coins.png", "file": "data/photos/coins.png", "references": ["rows of old coins"]} in refs[1]
    report = json.loads((ws / "runs" / "mine" / "eval_TEST.json").read_text())
    assert report["checkpoint"].endswith("last.pt") and report["references"]["kind"] == "raw"
    captions = json.loads((ws / "runs" / "mine" / "eval_TEST_captions_beam3.json").read_text())
    assert [c["image_id"] for c in captions] == [x["image_id"] for x in refs[2]]
    assert len(list((ws / "runs" / "mine" / "captions").glob("*.png"))) == 10
