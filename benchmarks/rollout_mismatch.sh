#!/usr/bin/env bash
# The sampler-vs-trainer mismatch on an MoE model (the main job's base, `mini` preset): the same 40-step
# GRPO run with fp32 rollouts, bf16 rollouts, bf16 rollouts with truncated importance sampling, and bf16
# rollouts with routing replay (R3), training in fp32 each time. Per-step `rollout_logp_gap`,
# `rollout_is_capped` and `routing_replay_changed` land in OUT/*/metrics.jsonl.
#   bash benchmarks/rollout_mismatch.sh runs/r1-zero/base/final runs/mismatch
set -euo pipefail
BASE=${1:?base model directory}; OUT=${2:-runs/mismatch}
PY=${PY:-.venv/bin/python}
ARGS="--model $BASE --task arithmetic --task-args min_digits=3,max_digits=3 --steps 40 --prompts-per-step 16
      --group-size 8 --max-new-tokens 64 --lr 3e-4 --eval-every 0 --eval-n 500 --eval-seed 20251123 --dtype float32
      --no-plots --no-save-final"
$PY -m nanoseek grpo $ARGS --rollout-dtype float32 --out "$OUT/fp32"
$PY -m nanoseek grpo $ARGS --rollout-dtype bfloat16 --out "$OUT/bf16"
$PY -m nanoseek grpo $ARGS --rollout-dtype bfloat16 --rollout-is truncate --out "$OUT/bf16-tis"
$PY -m nanoseek grpo $ARGS --rollout-dtype bfloat16 --routing-replay --out "$OUT/bf16-r3"
$PY - "$OUT" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
for run in ("fp32", "bf16", "bf16-tis", "bf16-r3"):
    d = Path(sys.argv[1]) / run
    recs = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if "rollout_logp_gap" in l]
    s = json.loads((d / "summary.json").read_text())
    g = [r["rollout_logp_gap"] for r in recs]
    print(f"{run:9s} gap mean {np.mean(g):.2e} max {max(g):.2e}  capped {np.mean([r.get('rollout_is_capped', 0) for r in recs]):.5f}  "
          f"held-out {s['accuracy_before']:.3f} -> {s['accuracy_after']:.3f}  reward last 5 {np.mean([r['reward'] for r in recs[-5:]]):.3f}"
          + (f"  routes replayed over the trainer's own {np.mean([r['routing_replay_changed'] for r in recs]):.5f}"
             if "routing_replay_changed" in recs[0] else "")
          + f"  {s['seconds']:.0f} s")
PY
