"""`nanoseek <verb>`: each verb is a thin call into one module's main(argv)."""
from __future__ import annotations

import importlib
import sys

from .common import UserError, tune_cpu_allocator
from .config import ConfigError

VERBS = {
    "info": ("nanoseek.info", "parameter counts and KV-cache size of a preset or model directory"),
    "pretrain": ("nanoseek.train.pretrain", "pretrain a DeepSeek-V3 model (MTP, bias balancing, resumable)"),
    "generate": ("nanoseek.inference.cli", "generate completions from a model directory"),
    "chat": ("nanoseek.inference.cli", "interactive chat with streaming and <think> display"),
    "serve": ("nanoseek.inference.server", "OpenAI-compatible HTTP server"),
    "sft": ("nanoseek.train.sft", "supervised fine-tuning on chat JSONL (cold start)"),
    "grpo": ("nanoseek.train.grpo", "GRPO reinforcement learning with verifiable rewards"),
    "sample": ("nanoseek.train.sample", "rejection sampling: keep verified samples as SFT JSONL"),
    "distill": ("nanoseek.train.distill", "distil a teacher's traces into a small dense student"),
    "eval": ("nanoseek.train.evaluate", "pass@1 / cons@k on a verifiable task"),
    "r1-zero": ("nanoseek.train.r1_zero", "the main job: pretrain -> pure RL -> eval -> distill, with a report"),
    "pp-sim": ("nanoseek.distributed.pp_sim", "simulate pipeline schedules: bubble and memory per rank"),
    "export": ("nanoseek.distributed.checkpoint", "write a distributed checkpoint (any layout) as an HF model directory"),
    "eplb": ("nanoseek.distributed.eplb", "place experts (with redundant replicas) from recorded loads; per-rank load before/after"),
}


def usage() -> str:
    lines = ["usage: nanoseek <verb> [options]   (nanoseek <verb> --help for a verb's options)", "", "verbs:"]
    lines += [f"  {v:<10} {doc}" for v, (_, doc) in VERBS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in VERBS:
        print(f"nanoseek: unknown verb {verb!r}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        tune_cpu_allocator()
        module = importlib.import_module(VERBS[verb][0])
        entry = getattr(module, "main_" + verb.replace("-", "_"), None) or module.main
        entry(rest)
    except (UserError, ConfigError) as e:
        print(f"nanoseek {verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nnanoseek {verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:      # `nanoseek info v3 | head`
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
