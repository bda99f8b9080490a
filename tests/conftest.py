"""The tests' fixtures (prepared shapes data, tiny trained checkpoints, the docs' workspace), each made
once for all of make test's processes, and the two tiers: a test is slow (marked one by one) when it
uses one of those fixtures, needs a process of its own (torchrun, a kill, a fresh interpreter, make) or
takes over 5 s alone;
`make test-fast` runs the others, and refuses a subprocess there. Scripts run in the test's own process
(tests/helpers.run_script) unless a test asks for a process. Shared helpers are in tests/helpers.py."""
import fcntl
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from models import TINY, WIDTHS
from tests.helpers import ROOT, run_script, scst_args, train_args

SCRIPTS = {"torchrun", "make"}  # besides sys.executable and *.py: what only slow tests may start


def shared(tmp_path_factory, name, make):
    """The folder `name`, made by make(folder) once for all of make test's processes: the first to ask
    makes it, under a lock that the others wait on (a process that failed leaves no mark: the next one
    starts over). Tests read it; a test that writes beside its files copies it first."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the session's folder, above each process's own
    folder, mark = base / name, base / f"{name}.made"
    with open(base / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not mark.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            make(folder)
            mark.touch()
    return folder


def check(r):
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """64 shapes images (TRAIN 52, VAL 6, TEST 6) and a briefly pretrained one-stage encoder, made once
    for the whole run."""
    def make(folder):
        check(run_script("create_input_files.py", "--dataset", "shapes", "--output-folder", folder,
                         "--num-images", 64, "--min-word-freq", 0, "--workers", 1))
        check(run_script("pretrain_encoder.py", "--output-folder", folder, "--stages", 1, "--encoded-size", 4,
                         "--steps", 30, "--batch-size", 8))
    return shared(tmp_path_factory, "shapes", make)


@pytest.fixture(scope="session")
def trained(shapes_data, tmp_path_factory):
    """A tiny trained checkpoint per decoder (an untrained model never emits <end>), made once for the
    whole run: trained(decoder) is its run folder's best.pt."""
    def get(decoder):
        def make(folder):
            widths = {k: 2 * TINY[k] for k in ("emb_dim", "decoder_dim")}
            check(run_script("train.py", *train_args(folder / f"trained-{decoder}", shapes_data, decoder=decoder,
                                                     epochs=12, decoder_lr=5e-3, dropout=0.0, log_every=100,
                                                     patience=0, **widths)))
        return shared(tmp_path_factory, f"trained-{decoder}", make) / f"trained-{decoder}" / "best.pt"
    return get


@pytest.fixture(scope="session")
def scst_run(trained, shapes_data, tmp_path_factory):
    """Four epochs of self-critical training from the tiny attention checkpoint."""
    def make(folder):
        check(run_script("train.py", *scst_args(folder / "scst", shapes_data, trained("attention"))))
    return shared(tmp_path_factory, "scst", make) / "scst"


# The demo's settings at test size: the same data generator, encoder and grid, 1,000 scenes instead of
# 10,000 (100 TEST images), small decoders, five epochs (cheap at this size: with two, the decoders'
# captions differ on every TEST image), the encoder pretrained for 150 steps.
TINY_DEMO = {**{k: 2 * TINY[k] for k in WIDTHS}, "transformer_warmup": 20, "epochs": 5, "val_max_images": 100}
TINY_DEMO_SCENES = 1000


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """A clone of this working tree (its files that git tracks or would add, committed in a repository
    of their own with configs/shapes.yaml at TINY_DEMO), after `make demo` at test size (the project's
    .venv linked in, TINY_DEMO_SCENES scenes, 150 pretraining steps): the docs' commands run there,
    `git status` there says whether they left the clone as it was, and its report.html is a
    demo-sized page for the browser tests. Made once for all of make test's processes: the first to
    ask makes it, under a lock that the others wait on."""
    return shared(tmp_path_factory, "demo-workspace", make_demo_workspace)


def make_demo_workspace(ws):
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        if os.path.isfile(os.path.join(ROOT, name)):  # not one deleted and not yet committed
            os.makedirs((ws / name).parent, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), ws / name)
    for name in ("requirements.txt", "pyproject.toml"):  # older than any install: no make there reinstalls
        os.utime(ws / name, (0, 0))  # into the shared .venv, whose editable install would then point here
    with open(ws / "configs" / "shapes.yaml") as f:
        demo = yaml.safe_load(f)
    with open(ws / "configs" / "shapes.yaml", "w") as f:
        yaml.safe_dump({**demo, **TINY_DEMO}, f, sort_keys=False)
    git = ["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], cwd=ws, check=True)
    subprocess.run(git + ["add", "-A"], cwd=ws, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "the clone"], cwd=ws, check=True)
    with open(ws / ".git" / "info" / "exclude", "a") as f:
        # a link to the venv the tests run in, and make's stamp for it
        f.write(".venv\n.installed\n")
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), ws / ".venv")
    (ws / ".installed").touch()  # newer than requirements.txt: make installs nothing
    r = subprocess.run(["make", "demo", f"PY={sys.executable}", "STAMP=.installed", "PRETRAIN_ARGS=--steps 150",
                        f"SHAPES_ARGS=--num-images {TINY_DEMO_SCENES}"], cwd=ws, capture_output=True, text=True,
                       timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def pytest_collection_modifyitems(items):
    """A test that uses prepared data (shapes, or the Karpathy-format fixtures) or a model trained on
    it runs scripts in subprocesses: mark it slow (the other subprocess tests are marked by hand).
    make test's processes take whole files in this order: the longest first (FIRST), so that no long
    one starts last, and the browser tests last, when the docs' workspace they share is made."""
    for item in items:
        if {"shapes_data", "trained", "scst_run", "demo_workspace", "coco", "src"} & set(
                getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    order = {name: k for k, name in enumerate(FIRST)}

    def rank(item):
        name = item.nodeid.split("::")[0].split("/")[-1]
        return len(FIRST) + 1 if name == "test_htmlpage.py" else order.get(name, len(FIRST))
    items.sort(key=rank)


# Test files by their time in make test, longest first (`pytest --durations`, 2026-12-07); the docs' second
# half after two others, so that the process that takes it does not wait long for the docs' workspace.
FIRST = ("test_docs.py", "test_train_torchrun.py", "test_eval.py", "test_docs_standalone.py", "test_metrics.py",
         "test_compare.py", "test_train.py", "test_caption.py", "test_train_hard.py", "test_train_crash.py",
         "test_train_scst.py")


@pytest.fixture(autouse=True)
def in_process_unless_slow(request, monkeypatch):
    """A test not marked slow that starts a Python script (or torchrun) fails, saying to mark it: the
    fast tier stays in one process. Tools the code under test runs itself (Java for coco-caption's
    tokenizer) are allowed."""
    if request.node.get_closest_marker("slow"):
        return
    start = subprocess.Popen.__init__

    def refuse(self, args, *a, **kw):
        first = str(args[0] if isinstance(args, list | tuple) else args).split()[0]
        if first == sys.executable or first.endswith(".py") or os.path.basename(first) in SCRIPTS:
            raise AssertionError(f"{request.node.nodeid} starts {first} in a subprocess: mark it slow")
        start(self, args, *a, **kw)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
