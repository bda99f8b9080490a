"""scripts/scale_bench.py: the made-up data is COCO-shaped, and its table says how each cost grows."""
import json
import os

import numpy as np

from scripts import scale_bench


def test_the_made_up_data_is_coco_shaped(tmp_path):
    scale_bench.make_data(str(tmp_path), 2000, 32, 24, workers=1)
    images = json.loads((tmp_path / "dataset_coco.json").read_text())["images"]
    splits = {s: sum(i["split"] == s for i in images) for s in scale_bench.COCO}
    assert splits == {"train": 1343, "restval": 495, "val": 81, "test": 81}  # COCO's shares of 2,000
    per_image = [len(i["sentences"]) for i in images]
    assert set(per_image) <= {5, 6, 7} and 5 <= np.mean(per_image) < 5.05
    lengths = [len(s["tokens"]) for i in images for s in i["sentences"]]
    assert 10.0 < np.mean(lengths) < 11.0 and max(lengths) <= 50 and sum(n >= 20 for n in lengths) > 5
    assert all(os.path.isfile(tmp_path / "images" / i["filepath"] / i["filename"]) for i in images)
    # At COCO's size (113,287 TRAIN images, 10.5 words a caption) about 9,500 words occur more than 5 times
    weights = 1.0 / np.arange(1, scale_bench.VOCABULARY + 1) ** scale_bench.ZIPF
    expected = 113287 * 5.0027 * np.mean(lengths) * weights / weights.sum()
    assert 9000 < (expected > 5).sum() < 10000


def test_the_table_says_how_each_cost_grows():
    def report(n, seconds):
        return {"num_images": n, "stages": {"prepare": {"seconds": seconds, "peak_mib": 700, "read_mb": n / 100,
                                                        "written_mb": n / 5}}}
    text = scale_bench.table([report(1000, 2.0), report(10000, 20.0), report(100000, 400.0)])
    row = next(line for line in text.splitlines() if line.startswith("| prepare"))
    assert row.endswith("| 1.30 |")  # 20 s -> 400 s for 10x the images: N^1.30, worse than linear
    assert "| 2.0 / 700 / 10 / 200 |" in row


def test_the_significance_stage_times_every_part():
    """The bootstrap at COCO's TEST size is measured by this stage; at 200 images it runs in a moment."""
    result = scale_bench.significance_test(None, images=200)
    assert result["bootstrap_s"] > 0 and "200 images x 1000 resamples" in result["note"]
    assert "resampling both runs" in result["note"]
