"""lm-evaluation-harness against `nanoseek serve`, end to end, on a multiple-choice task written here.

    python benchmarks/lm_eval_local.py MODEL_DIR [--docs 200] [--out benchmarks/results/lm_eval_local.json]

1. Writes an lm-eval task (YAML + JSONL, no downloads): held-out arithmetic questions in the main job's
   prompt format, the reference answer among three near misses (off by one, off by ten, the carry
   into the leading column dropped), scored as `<answer>X</answer>` continuations.
2. Serves MODEL_DIR (the real server, in a background thread) and runs lm-eval's `local-completions`
   model on it: loglikelihood requests (`echo` + `logprobs` on /v1/completions, token-id prompts).
3. Recomputes every choice's log-likelihood with nanoseek's model directly (one forward per choice,
   the token split lm-eval makes) and compares: per-choice |difference| and the accuracy.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from nanoseek.data.corpus import prompt_text  # noqa: E402
from nanoseek.data.tasks import get_task  # noqa: E402

TASK = "nanoseek_arith_mc"
YAML = f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: DATA
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_task(root: Path, n_docs: int, seed: int = 0) -> Path:
    """The task directory (YAML + JSONL): `n_docs` held-out arithmetic questions, 4 choices each."""
    task = get_task("arithmetic", min_digits=3)
    rng = random.Random(seed)
    docs = []
    for p in task.problems(n_docs, seed, "test"):
        right = int(p.answer)
        slipped = task.slipped_solution(p, rng, caught=False)          # the carry into the leading column dropped
        slip = int(slipped.rsplit("<answer>", 1)[1].split("</answer>")[0]) if slipped else right - 100
        wrong = [w for w in dict.fromkeys([right + 1, right - 10, slip, right + 100, right - 1]) if w != right][:3]
        choices = [right] + wrong
        rng.shuffle(choices)
        docs.append({"context": prompt_text(p.question) + "<answer>",
                     "choices": [f"{c}</answer>" for c in choices], "label": choices.index(right)})
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    (root / f"{TASK}.yaml").write_text(YAML.replace("DATA", str(data)), encoding="utf-8")
    return root


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a causal LM request: trailing spaces move to the continuation, the whole text is
    encoded once and the continuation is what follows the context's tokens."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return whole[: len(ctx)], whole[len(ctx):]


@torch.no_grad()
def own_loglikelihood(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    lp = torch.log_softmax(model(ids)[0, :-1].float(), dim=-1)
    return float(sum(lp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def run(model_dir: str, n_docs: int = 200, workdir: str | None = None) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer
    root = write_task(Path(workdir or tempfile.mkdtemp()) / "task", n_docs)
    name = "nanoseek-model"
    t0 = time.perf_counter()
    from nanoseek.inference import LLM
    from nanoseek.inference.server import build_app, serve_in_thread
    llm = LLM(model_dir, max_batch=8, compile=False)
    with serve_in_thread(build_app(llm, name)) as url:
        # include_defaults=False: lm_eval would otherwise index its ~14,000 built-in task files (~17 s)
        tasks = TaskManager(include_path=str(root), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model="local-completions", tasks=[TASK], task_manager=tasks,
            model_args={"model": name, "base_url": url + "/v1/completions", "tokenizer_backend": "huggingface",
                        "tokenizer": model_dir, "num_concurrent": 1, "max_retries": 1, "tokenized_requests": True},
            log_samples=True, batch_size=1)
        seconds = time.perf_counter() - t0
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = llm.model
        diffs, right = [], 0
        samples = out["samples"][TASK]
        for s in samples:
            args = s["arguments"].values() if isinstance(s["arguments"], dict) else s["arguments"]
            with llm.engine._autocast():          # the precision the server computes in (measured per host)
                ours = [own_loglikelihood(model, *split_pair(tok, *a)) for a in args]
            theirs = [r[0] for r in s["filtered_resps"]]
            diffs += [abs(a - float(b)) for a, b in zip(ours, theirs)]
            right += int(max(range(len(ours)), key=ours.__getitem__) == s["doc"]["label"])
    acc = out["results"][TASK]["acc,none"]
    return {"model": model_dir, "docs": len(samples), "choices": len(diffs), "lm_eval_acc": acc,
            "nanoseek_acc": right / len(samples), "max_abs_loglik_diff": max(diffs), "seconds": round(seconds, 1),
            "dtype": str(llm.engine.autocast_dtype).replace("torch.", ""),
            "lm_eval_version": lm_eval.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="+")
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--out", default="benchmarks/results/lm_eval_local.json")
    args = ap.parse_args()
    from nanoseek.calibrate import cpu_name
    cpu = cpu_name()
    results = []
    for d in args.model_dir:
        r = run(d, args.docs)
        print(json.dumps(r), flush=True)
        results.append(r)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"cpu": cpu, "results": results}, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
