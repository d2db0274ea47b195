"""The FP8 reference quantizer on CPU: 1x128 tiles of a bf16 activation, 128x128 blocks of an fp32
weight, and the weight-gradient operand (128x1 groups, transposed), ms per call.

    .venv/bin/python benchmarks/bench_fp8_quantize.py [--rows 4096 --cols 2048 --reps 10] [--src DIR]

--src runs another checkout's nanoseek (e.g. a `git worktree` of an older commit) for an A/B.
"""
import argparse
import sys
import time

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--src", default=None, help="a checkout whose nanoseek to import instead")
    args = ap.parse_args()
    if args.src:
        sys.path.insert(0, args.src)
    from nanoseek.quant import fp8
    torch.manual_seed(0)
    x = torch.randn(args.rows, args.cols).bfloat16()
    cases = {"act_1x128_bf16": lambda: fp8.quantize(x, fp8.ACT),
             "weight_128x128_fp32": lambda: fp8.quantize(x.float(), fp8.WEIGHT),
             "wgrad_128x1_bf16": lambda: fp8.quantize(x, fp8.COL)}
    res = {"nanoseek": fp8.__file__, "shape": [args.rows, args.cols]}
    for name, fn in cases.items():
        fn()
        t = time.perf_counter()
        for _ in range(args.reps):
            fn()
        res[name + "_ms"] = round((time.perf_counter() - t) / args.reps * 1e3, 2)
    print(res)


if __name__ == "__main__":
    main()
