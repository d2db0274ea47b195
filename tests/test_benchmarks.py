"""The GPU benchmark runs only where a GPU is lent; its --tiny CPU mode keeps the same code alive here."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench_gpu_tiny(tmp_path, *extra) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NANOSEEK_NO_PROGRESS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--out", str(tmp_path),
                        *extra], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert res["env"]["tiny"] and res["env"]["commit"] and res["env"]["peak_flops"] > 0
    for part in ("greedy_fp32_vs_hf", "attention", "moe", "train", "decode_small"):
        assert "error" not in res[part] and "skipped" not in res[part], res[part]
    assert res["greedy_fp32_vs_hf"] == {"identical": 8, "of": 8}
    assert max(res["moe"]["max_rel_diff"].values()) < 0.05 and res["moe"]["grouped"]["fwd_bwd_ms"] > 0
    assert res["attention"]["sdpa_dense"]["fwd_bwd_ms"] > 0 and res["attention"]["block_mask_ms"] > 0
    for b in ("b1", "b8"):
        d = res["decode_small"][b]
        assert d["nanoseek_tok_s"] > 0 and d["hf_tok_s"] > 0 and 0 < d["roofline_fraction"]
    return res


def test_bench_gpu_tiny_runs_on_cpu(tmp_path):
    """Every part of the GPU benchmark at toy size; the training contenders but the compiled one (its cold
    compile is ~90 s on 2 cores: the slow test below runs it)."""
    res = run_bench_gpu_tiny(tmp_path, "--train-modes", "eager,eager_dense")
    for mode in ("nanoseek_eager", "nanoseek_eager_dense", "hf"):
        assert 0 < res["train"][mode]["mfu"] and res["train"][mode]["tok_s"] > 0, res["train"][mode]
    assert "nanoseek_compiled" not in res["train"]


@pytest.mark.slow
def test_bench_gpu_tiny_compiled_training_step(tmp_path):
    res = run_bench_gpu_tiny(tmp_path, "--train-modes", "eager,compiled,compiled_docs4")
    for mode in ("nanoseek_eager", "nanoseek_compiled", "nanoseek_compiled_docs4", "hf"):
        assert 0 < res["train"][mode]["mfu"] and res["train"][mode]["tok_s"] > 0, res["train"][mode]


def test_bench_gpu_rejects_unknown_train_modes(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--train-modes", "eagr",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and "--train-modes: unknown eagr" in r.stderr and "Traceback" not in r.stderr


def test_bench_gpu_without_a_gpu_says_to_use_tiny():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py")], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert r.returncode == 2 and "--tiny" in r.stderr and "Traceback" not in r.stderr
