"""Every command of the README and the docs pages, run as written: in a workspace that `make demo`
made (conftest.demo_workspace), page after page in the order the README lists them, each block after
the ones before it, with the project's .venv activated as the pages say to (scripts/run_docs.py).
A block the page marks `<!-- not run: why -->` is skipped, saying why. The pages whose commands use
only what make demo made, and make nothing another page uses, run in tests/test_docs_standalone.py,
beside these (make test runs a test file whole in one process, in order): the two halves share the
workspace and take half the time each."""
import os
import re
import subprocess
import sys

import pytest

from scripts.run_docs import blocks
from tests.helpers import ROOT


PAGES = ("README.md", "docs/tutorial.md", "docs/data.md", "docs/shapes.md", "docs/training.md", "docs/transformer.md",
         "docs/scst.md", "docs/hard-attention.md", "docs/attention-maps.md", "docs/evaluation.md", "docs/benchmarks.md",
         "docs/troubleshooting.md", "docs/differences-from-the-tutorial.md")


# The pages that build on each other (transformer.md's make transformer on the demo's runs, the
# evaluation page on scst.md's run), in the README's order; test_docs_standalone.py runs the others.
STANDALONE = ("docs/data.md", "docs/shapes.md", "docs/training.md", "docs/hard-attention.md", "docs/attention-maps.md",
              "docs/benchmarks.md")
CHAINED = tuple(p for p in PAGES if p not in STANDALONE)


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


@pytest.mark.parametrize("page", CHAINED)
def test_page_runs_as_written(demo_workspace, page):
    run_page(demo_workspace, page)


def run_page(demo_workspace, page):
    """A page's commands in the workspace, as written; then git status there must be empty."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "run_docs.py"), os.path.join(ROOT, page),
                        "--cwd", demo_workspace], capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, f"{page}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    # make demo (before README.md) and every page's commands leave the clone as it was
    status = subprocess.run(["git", "status", "--porcelain"], cwd=demo_workspace, capture_output=True, text=True)
    assert status.stdout == "", f"after {page}, git status shows:\n{status.stdout}"
    if page == "README.md":
        assert "not run: tests/test_docs.py makes its workspace with make demo" in r.stdout
