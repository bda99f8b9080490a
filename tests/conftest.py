"""The tests' fixtures (prepared shapes data, tiny trained checkpoints) and the two tiers: a test that
runs a script in a subprocess is slow; `make test-fast` runs the others, and refuses a subprocess
there. Shared helpers are in tests/helpers.py."""
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT, run_script, scst_args, train_args

SCRIPTS = {"torchrun", "make"}  # besides sys.executable and *.py: what only slow tests may start


@pytest.fixture(scope="session")
def shapes_data(tmp_path_factory):
    """64 shapes images (TRAIN 52, VAL 6, TEST 6) and a briefly pretrained one-stage encoder, made once
    for the whole session."""
    folder = tmp_path_factory.mktemp("shapes")
    r = run_script("create_input_files.py", "--dataset", "shapes", "--output-folder", folder,
                   "--num-images", 64, "--min-word-freq", 0, "--workers", 1)
    assert r.returncode == 0, r.stderr
    r = run_script("pretrain_encoder.py", "--output-folder", folder, "--stages", 1, "--encoded-size", 4,
                   "--steps", 30, "--batch-size", 8)
    assert r.returncode == 0, r.stderr
    return folder


@pytest.fixture(scope="session")
def trained(shapes_data, tmp_path_factory):
    """A tiny trained checkpoint per decoder (an untrained model never emits <end>)."""
    runs = {}

    def get(decoder):
        if decoder not in runs:
            out = tmp_path_factory.mktemp(f"trained-{decoder}")
            r = run_script("train.py", *train_args(out, shapes_data, decoder=decoder, epochs=12,
                                                   decoder_lr=5e-3, dropout=0.0, log_every=100, patience=0,
                                                   emb_dim=32, decoder_dim=64))
            assert r.returncode == 0, r.stderr
            runs[decoder] = out / "best.pt"
        return runs[decoder]
    return get


@pytest.fixture(scope="session")
def scst_run(trained, shapes_data, tmp_path_factory):
    """Four epochs of self-critical training from the tiny attention checkpoint."""
    run = tmp_path_factory.mktemp("scst") / "scst"
    r = run_script("train.py", *scst_args(run, shapes_data, trained("attention")))
    assert r.returncode == 0, r.stderr
    return run


# The demo's settings at test size: the same data, encoder and grid, small decoders, two epochs.
TINY_DEMO = {"emb_dim": 32, "decoder_dim": 64, "attention_dim": 32, "epochs": 2, "val_max_images": 100}


@pytest.fixture(scope="session")
def demo_workspace(tmp_path_factory):
    """A folder that looks like a clone of this repository after `make demo`, made by `make demo`
    itself (the project's .venv linked in, configs/shapes.yaml at TINY_DEMO, 40 pretraining steps):
    the docs' commands run there, and its report.html is a demo-sized page for the browser tests."""
    ws = tmp_path_factory.mktemp("workspace")
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("html", "scripts", "Makefile", "requirements.txt", "pyproject.toml"):
            os.symlink(os.path.join(ROOT, name), ws / name)
    os.symlink(os.path.dirname(os.path.dirname(sys.executable)), ws / ".venv")  # the venv this test runs in
    shutil.copytree(os.path.join(ROOT, "configs"), ws / "configs")
    with open(ws / "configs" / "shapes.yaml") as f:
        demo = yaml.safe_load(f)
    with open(ws / "configs" / "shapes.yaml", "w") as f:
        yaml.safe_dump({**demo, **TINY_DEMO}, f, sort_keys=False)
    (ws / ".installed").touch()  # newer than requirements.txt: make installs nothing
    r = subprocess.run(["make", "demo", f"PY={sys.executable}", "STAMP=.installed", "PRETRAIN_ARGS=--steps 40"],
                       cwd=ws, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return ws


def pytest_collection_modifyitems(items):
    """A test that uses prepared data (shapes, or the Karpathy-format fixtures) or a model trained on
    it runs scripts in subprocesses: mark it slow (the other subprocess tests are marked by hand)."""
    for item in items:
        if {"shapes_data", "trained", "scst_run", "demo_workspace", "coco", "src"} & set(
                getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
