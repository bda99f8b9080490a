"""Every command of the README and the docs pages, run as written: in a workspace that `make demo`
made (conftest.demo_workspace), page after page in the order the README lists them, each block after
the ones before it, with the project's .venv activated as the pages say to (scripts/run_docs.py).
A block the page marks `<!-- not run: why -->` is skipped, saying why. So the tests of this file run
in one process, in order (tests/conftest.py: a group of their own in make test)."""
import json
import os
import re
import subprocess
import sys

import pytest

from scripts.run_docs import blocks
from tests.helpers import ROOT

pytestmark = pytest.mark.slow  # the workspace is made by make demo

PAGES = ("README.md", "docs/tutorial.md", "docs/data.md", "docs/shapes.md", "docs/training.md", "docs/transformer.md",
         "docs/scst.md",
         "docs/hard-attention.md", "docs/evaluation.md", "docs/benchmarks.md", "docs/troubleshooting.md",
         "docs/differences-from-the-tutorial.md")


def test_the_readme_links_every_page_in_this_order():
    readme = open(os.path.join(ROOT, "README.md")).read()
    linked = re.findall(r"\]\((docs/[\w-]+\.md)\)", readme.split("## Documentation", 1)[1])
    assert tuple(dict.fromkeys(linked)) == PAGES[1:]
    assert sorted(PAGES[1:]) == sorted(f"docs/{f}" for f in os.listdir(os.path.join(ROOT, "docs")) if f.endswith(".md"))


@pytest.mark.parametrize("page", PAGES)
def test_page_says_how_to_run_its_commands(page):
    """A page with `python ...` commands or Python code says to activate the project's Python first."""
    code = [(language, text) for _, language, text, _ in blocks(os.path.join(ROOT, page))]
    if any(language == "python" or re.search(r"^(\S+=\S+ )*(python|torchrun) ", text, re.M) for language, text in code):
        assert "source .venv/bin/activate" in open(os.path.join(ROOT, page)).read(), page


def test_the_readme_is_a_page_to_scan():
    assert len(open(os.path.join(ROOT, "README.md")).read().splitlines()) <= 200


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(demo_workspace, page):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_docs.py"), os.path.join(ROOT, page),
                        "--cwd", demo_workspace], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, f"{page}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    # make demo (before README.md) and every page's commands leave the clone as it was
    status = subprocess.run(["git", "status", "--porcelain"], cwd=demo_workspace, capture_output=True, text=True)
    assert status.stdout == "", f"after {page}, git status shows:\n{status.stdout}"
    if page == "README.md":
        assert "not run: tests/test_docs.py makes its workspace with make demo" in r.stdout


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
