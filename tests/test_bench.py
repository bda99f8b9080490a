"""bench.py runs its matrix (tiny model) and writes what docs/benchmarks.md is made of."""
import json
import os
import sys

import pytest

from tests.helpers import SHAPES_NAME, run_script


@pytest.mark.slow
def test_bench_tiny_matrix(tmp_path):
    out = tmp_path / "bench" / "cpu.json"
    r = run_script("bench.py", "--tiny", "--device", "cpu", "--decoder", "attention", "--precision", "fp32", "fp16",
                   "bf16", "--encoder-mode", "finetune", "cached", "--accumulation", 1, 2, 3, "--beam-size", 1, 2,
                   "--group", 1, 2, "--out", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    rows = result["training"]
    # fp16 is CUDA-only and 4 images do not split into 3 micro-batches: 2 precisions x 2 encoders x 2
    # accumulations x 2 captions per image (grouped batches)
    assert {(x["precision"], x["encoder"], x["accumulation"], x["captions_per_image"]) for x in rows} == {
        (p, e, a, k) for p in ("fp32", "bf16") for e in ("finetune", "cached") for a in (1, 2) for k in (1, 2)}
    for x in rows:
        assert x["micro_batch"] * x["accumulation"] == x["batch"] == 4
        assert x["peak_memory_mb"] > 0
    # batched and one-at-a-time decoding did the same work: the same captions
    assert [(x["beam"], x["same_captions"]) for x in result["decoding"]] == [(1, True), (2, True)]
    assert result["card"].startswith("CPU") and result["torch"]
    assert "CIDEr-D reward" in r.stdout and result["reward"]["images"] * result["reward"]["samples"] == 160
    assert "| attention | bf16 | cached | 4 (2 x 2) |" in r.stdout and "| attention | 2 |" in r.stdout
    r = run_script("bench.py", "--tiny", "--data-folder", tmp_path)
    assert r.returncode == 2 and "--data-name" in r.stderr


@pytest.mark.slow
def test_bench_on_a_cpu_without_bf16_lstm_kernels(tmp_path, monkeypatch, capsys):
    """ONEDNN_MAX_CPU_ISA=AVX2 stands in for an AVX2-only CPU: the plain decoder's bf16 row runs (its
    LSTM in fp32), and a configuration that cannot run at all is marked and the others still run."""
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    out = tmp_path / "cpu.json"
    r = run_script("bench.py", "--tiny", "--device", "cpu", "--decoder", "rnn", "--precision", "fp32", "bf16",
                   "--encoder-mode", "cached", "--accumulation", 1, "--beam-size", 1, "--out", out, env=env)
    assert r.returncode == 0, r.stderr
    rows = json.loads(out.read_text())["training"]
    assert [x["precision"] for x in rows] == ["fp32", "bf16"] and all(x["images_per_s"] > 0 for x in rows)

    import bench
    import train

    def broken(*args):
        raise RuntimeError("could not create a primitive descriptor for the LSTM forward propagation primitive")
    monkeypatch.setattr(train, "train_step", broken)
    monkeypatch.setattr(sys, "argv", ["bench.py", "--tiny", "--device", "cpu", "--decoder", "rnn", "--precision",
                                      "fp32", "--encoder-mode", "cached", "--accumulation", 1, "--beam-size", 1])
    monkeypatch.setattr(sys, "argv", [str(a) for a in sys.argv])
    bench.main()  # no traceback: the row says why
    assert "cannot run here: could not create a primitive descriptor" in capsys.readouterr().out


def test_timed_is_the_median_and_spread_of_the_timed_runs(monkeypatch):
    """Warm-up calls are not timed; the figures are the median, min and max of the timed ones."""
    import bench
    clock, durations, calls = [0.0], iter([9.0, 3.0, 1.0, 2.0, 7.0, 4.0]), []

    def work():
        calls.append(1)
        clock[0] += next(durations)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    assert bench.timed(work, bench.torch.device("cpu"), runs=5, warmup=1) == (3.0, 1.0, 7.0)
    assert len(calls) == 6


@pytest.mark.slow
def test_bench_times_the_loader_over_prepared_images(shapes_data, tmp_path):
    """With prepared data: the loader's rate, the batches' lengths drawn from its captions (less padding
    with length_pool), every step's FLOPs counted, the plain decoder's fused LSTM included, and set
    against the machine's matrix product."""
    out = tmp_path / "bench.json"
    r = run_script("bench.py", "--tiny", "--device", "cpu", "--decoder", "rnn", "--precision", "fp32", "--encoder-mode",
                   "cached", "--accumulation", 1, "--group", 1, 2, "--beam-size", 1, "--data-folder", shapes_data,
                   "--data-name", SHAPES_NAME, "--length-pool", 0, 20, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "data: " in r.stdout and "DataLoader over prepared 64 px images" in r.stdout
    assert "| rnn | fp32 | cached | 4 (4 x 1, 2 per image) |" in r.stdout  # grouped: 2 images x 2 captions
    assert "| rnn | fp32 | cached | 4 (4 x 1, length_pool 20) |" in r.stdout
    result = json.loads(out.read_text())
    rows = {(x["captions_per_image"], x["length_pool"]): x for x in result["training"]}
    assert rows[1, 20]["useful_share"] > rows[1, 0]["useful_share"]
    lstm = 2 * 4 * (16 + 32) * 4 * 32  # a word step of the tiny LSTM's products (emb 16, hidden 32), 4 captions
    assert all(x["flop"] > lstm * 3 and 0 < x["peak_share"] for x in rows.values())
    assert result["matmul_peak_gflop_per_s"] > 0
    r = run_script("bench.py", "--tiny", "--length-pool", 10)
    assert r.returncode == 2 and "--length-pool draws lengths from the data: give --data-folder" in r.stderr
