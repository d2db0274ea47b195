"""The decode step's GEMM kernels (nanoseek/inference/runner/gemm.py) on one host: microseconds per call of
every kernel this CPU offers, for a few rows times the decode benchmark model's weight shapes.

    .venv/bin/python benchmarks/bench_decode_gemm.py                      # rows 1 2 4 8, fp32 kernels
    .venv/bin/python benchmarks/bench_decode_gemm.py --rows 1 2 --bf16    # bf16 kernels too

Each call is timed as the best of `--rounds` rounds of n calls, the kernels taking turns within a round
(this host's speed drifts); the plain fp32 `F.linear` is the reference every other kernel is checked
against (max abs difference in the JSON) and the ratio's denominator.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from results_io import report

# K x N of the benchmark model's decode GEMMs (bench_model.py: hidden 256) and the demo's 1M model (hidden 128)
SHAPES = [(256, 4096), (4096, 256), (256, 1024), (1024, 256), (128, 768), (384, 128), (128, 112)]


def per_call_us(fn, n: int, best: float) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return min(best, (time.perf_counter() - t) / n * 1e6)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--bf16", action="store_true", help="the bf16 kernels as well")
    args = ap.parse_args()
    if min(args.rows) < 1 or args.rounds < 1:
        ap.error("--rows and --rounds must be positive")
    from bench_decode import cpu_model
    from nanoseek.inference.runner import gemm
    torch.set_num_threads(2)
    kinds = gemm.available(torch.device("cpu"), (torch.float32, torch.bfloat16) if args.bf16 else (torch.float32,))
    res = {"host": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(), "kinds": kinds,
           "us_per_call": {}, "vs_fp32": {}, "max_abs_diff": {}}
    g = torch.Generator().manual_seed(0)
    for M in args.rows:
        for K, N in SHAPES:
            w32, x32 = torch.randn(N, K, generator=g), torch.randn(M, K, generator=g)
            ref = F.linear(x32, w32)
            calls, diff = {}, {}
            for kind in kinds:
                dt = gemm.DTYPE[kind]
                w, x = w32.to(dt), x32.to(dt)
                calls[kind] = (lambda x=x, w=w, p=gemm.pack(w, kind, M), k=kind: gemm.linear(x, w, p, k))
                diff[kind] = float((calls[kind]().float() - ref).abs().max())
            n = max(20, min(1000, int(2e8 / (M * K * N + 1e5))))
            best = dict.fromkeys(kinds, float("inf"))
            for _ in range(args.rounds):
                for kind, fn in calls.items():
                    best[kind] = per_call_us(fn, n, best[kind])
            key = f"{M}x{K}x{N}"
            res["us_per_call"][key] = {k: round(v, 1) for k, v in best.items()}
            res["vs_fp32"][key] = {k: round(best["fp32"] / v, 2) for k, v in best.items() if k != "fp32"}
            res["max_abs_diff"][key] = {k: v for k, v in diff.items() if k != "fp32"}
            print(key, res["us_per_call"][key], flush=True)
    report("bench_decode_gemm", res)


if __name__ == "__main__":
    main()
