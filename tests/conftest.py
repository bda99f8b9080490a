import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES_NAME = "shapes_5_cap_per_img_0_min_word_freq"
ENCODER = "encoder_resnet18_stages1.pt"
# A model small enough that a test run takes seconds: resnet18 stem + layer1, a 4x4 grid.
TINY = {"config": "configs/shapes.yaml", "data_name": SHAPES_NAME, "encoder_stages": 1, "encoded_size": 4,
        "emb_dim": 16, "decoder_dim": 32, "attention_dim": 16, "batch_size": 8, "workers": 0,
        "log_every": 1, "max_decode_len": 20, "val_max_images": 0, "fine_tune_encoder": "false",
        "train_captions_per_image": 0}


def run_script(script, *args, **kw):
    cmd = [sys.executable, script, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, **kw)


def train_args(out, data, **overrides):
    """train.py's arguments for a TINY run on `data`, with the encoder the shapes_data fixture pretrained."""
    cfg = dict(TINY, data_folder=data, out=out, encoder_weights=os.path.join(data, ENCODER))
    cfg.update(overrides)
    return [a for k, v in cfg.items() for a in (f"--{k}", v)]


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
