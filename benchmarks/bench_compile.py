"""How long the decode runner takes to compile its batch buckets, cold and from inductor's disk cache.

What `nanoseek serve` pays at start-up (it compiles every bucket up to --max-batch) and what the
"auto" compile policy weighs against the eager steps a bucket would save. Two fresh processes share
one new inductor cache directory: the first compiles from nothing, the second should load every graph
from the cache (a graph that cannot be cached, e.g. one holding a torch.cond, recompiles there).

    .venv/bin/python benchmarks/bench_compile.py                  # benchmark model, buckets 1..64
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from results_io import report


def child(model_dir: str, buckets: list[int]) -> dict:
    import torch

    import nanoseek
    from nanoseek.inference.cache import LatentCache
    from nanoseek.inference.runner import DecodeRunner
    from torch._dynamo.utils import counters

    model = nanoseek.from_pretrained(model_dir)
    cfg = model.cfg
    cache = LatentCache(cfg.num_hidden_layers, max(buckets), 128, cfg.kv_lora_rank + cfg.qk_rope_head_dim,
                        torch.float32)
    runner = DecodeRunner(model, cache, (torch.float32, torch.bfloat16), compile=True, max_batch=max(buckets))
    t = time.perf_counter()
    runner.warmup(buckets)
    return {"total_s": round(time.perf_counter() - t, 1), "per_bucket_s": runner.stats["compile_s"],
            "fx_graph_cache": {k: v for k, v in counters["inductor"].items() if k.startswith("fxgraph_cache")}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--buckets", default="1,2,4,8,16,32,64")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    if args.child:
        print(json.dumps(child(args.child, buckets)))
        return
    from bench_decode import cpu_model
    from bench_model import hf_config
    from transformers import DeepseekV3ForCausalLM
    import torch

    torch.manual_seed(0)
    model_dir = tempfile.mkdtemp()
    DeepseekV3ForCausalLM(hf_config()).save_pretrained(model_dir)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(), "NANOSEEK_NO_PROGRESS": "1"}
    runs = {}
    for name in ("cold", "from_cache"):
        p = subprocess.run([sys.executable, __file__, "--buckets", args.buckets, "--child", model_dir],
                           env=env, capture_output=True, text=True, check=True)
        runs[name] = json.loads(p.stdout.strip().splitlines()[-1])
    report("bench_compile", {"host": cpu_model(), "torch": torch.__version__, "buckets": buckets, **runs})


if __name__ == "__main__":
    main()
