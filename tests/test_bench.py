"""bench.py runs its matrix (tiny model) and writes what docs/benchmarks.md is made of."""
import json

from tests.conftest import run_script


def test_bench_tiny_matrix(tmp_path):
    out = tmp_path / "bench" / "cpu.json"
    r = run_script("bench.py", "--tiny", "--device", "cpu", "--decoder", "attention", "--precision", "fp32", "fp16",
                   "bf16", "--encoder-mode", "finetune", "cached", "--accumulation", 1, 2, 3, "--beam-size", 1, 2,
                   "--out", out)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    rows = result["training"]
    # fp16 is CUDA-only and 4 images do not split into 3 micro-batches: 2 precisions x 2 encoders x 2 accumulations
    assert {(x["precision"], x["encoder"], x["accumulation"]) for x in rows} == {
        (p, e, a) for p in ("fp32", "bf16") for e in ("finetune", "cached") for a in (1, 2)}
    for x in rows:
        assert x["micro_batch"] * x["accumulation"] == x["batch"] == 4
        assert 0 < x["images_per_s_min"] <= x["images_per_s"] <= x["images_per_s_max"] and x["peak_memory_mb"] > 0
    assert [(x["beam"], x["speedup"] > 0) for x in result["decoding"]] == [(1, True), (2, True)]
    assert result["card"].startswith("CPU") and result["torch"]
    assert "| attention | bf16 | cached | 4 (2 x 2) |" in r.stdout and "| attention | 2 |" in r.stdout
    r = run_script("bench.py", "--tiny", "--data-folder", tmp_path)
    assert r.returncode == 2 and "--data-name" in r.stderr
