"""GRPO throughput: nanoseek vs TRL's GRPOTrainer on the same HF-format model, prompts and reward, one run.

The shape of ../shared/peers/trl_baseline.py: a random DeepseekV3 (hidden 256, 4 layers, 16 experts
top-4), prompts "a+b=", reward 1 if the completion starts with the sum, 8 prompts x G=8 completions
of up to 64 new tokens per step, temperature 1, lr 1e-5, beta 0, one update per rollout (TRL's
defaults: loss "dapo", scale_rewards "group"). Both sides load the same saved model directory (our
BPE tokenizer, which transformers loads as well). Metric: completion tokens per second of whole
steps (generation + reward + update), after one warm-up step.

    .venv/bin/python benchmarks/bench_grpo.py --steps 4
"""
import argparse
import os
import tempfile
import time

import torch
from results_io import report

os.environ.setdefault("WANDB_DISABLED", "true")


def build_model_dir(vocab_texts):
    from bench_model import hf_config
    from transformers import DeepseekV3ForCausalLM

    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(vocab_texts, vocab_size=300)
    cfg = hf_config(vocab_size=tok.vocab_size, max_position_embeddings=512,
                    bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, pad_token_id=tok.eos_id)
    torch.manual_seed(0)
    d = tempfile.mkdtemp()
    DeepseekV3ForCausalLM(cfg).save_pretrained(d)
    tok.save(d)
    return d


def reward(completions, answers):
    return [1.0 if c.strip().startswith(a) else 0.0 for c, a in zip(completions, answers)]


def run_trl(model_dir, prompts, answers, steps, G, max_new):
    from datasets import Dataset
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = DeepseekV3ForCausalLM.from_pretrained(model_dir)
    ds = Dataset.from_dict({"prompt": prompts, "answer": answers})
    n_tokens = []

    def trl_reward(completions, answer, completion_ids=None, **kw):
        n_tokens.append(sum(len(c) for c in completion_ids) if completion_ids is not None else 0)
        return reward(completions, answer)

    args = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=len(prompts) // (steps + 1) * G,
                      num_generations=G, max_completion_length=max_new, max_steps=steps + 1, logging_steps=1,
                      report_to=[], use_cpu=True, bf16=False, learning_rate=1e-5, save_strategy="no",
                      temperature=1.0)
    tr = GRPOTrainer(model=model, reward_funcs=trl_reward, args=args, train_dataset=ds, processing_class=tok)
    times = []

    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    tr.add_callback(Timer())
    gen_times = []
    gen = tr._generate_and_score_completions

    def timed_gen(*a, **k):                    # TRL's own split: generation + scoring vs the rest
        t = time.perf_counter()
        out = gen(*a, **k)
        gen_times.append(time.perf_counter() - t)
        return out

    tr._generate_and_score_completions = timed_gen
    tr.train()
    n = max(1, len(gen_times) - 1)
    split = {"generate_and_score_s": round(sum(gen_times[1:]) / n, 2),
             "update_s": round((sum(times[1:]) - sum(gen_times[1:])) / n, 2)}
    return sum(n_tokens[1:]) / sum(times[1:]), times, split


def run_nanoseek(model_dir, prompts, answers, steps, G, max_new, compile="auto"):
    import nanoseek
    from nanoseek.inference.sampling import SamplingParams
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.grpo import GRPOConfig, build_batch, train_on_batch, width_multiple
    from nanoseek.train.grpo_loss import group_advantages
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.rollout import EngineSampler

    from nanoseek.common import compute_dtype

    tok = Tokenizer.load(model_dir)
    model = nanoseek.from_pretrained(model_dir)
    cfg = GRPOConfig(group_size=G, max_new_tokens=max_new, lr=1e-5, beta=0.0, loss_type="dapo")   # default dtypes
    dtype = compute_dtype(torch.device("cpu"), None, model.cfg.hidden_size, len(prompts) // (steps + 1) * G * max_new)
    sampler = EngineSampler(model, tok, max_batch=256, max_len=max_new + 64,
                            compile={"auto": "auto", "warm": True}[compile])
    if compile == "warm":                        # every rollout bucket compiled up front, as `serve` does
        sampler.engine.runner.warmup([b for b in (1, 2, 4, 8, 16, 32, 64)])
    opt = build_optimizer(model, cfg.lr, 0.0)
    sp = SamplingParams(n=G, temperature=1.0, max_tokens=max_new)
    per_step = len(prompts) // (steps + 1)
    tokens, times, split = [], [], {"rollout_s": 0.0, "update_s": 0.0}
    for s in range(steps + 1):
        t = time.perf_counter()
        batch_p = prompts[s * per_step:(s + 1) * per_step]
        batch_a = answers[s * per_step:(s + 1) * per_step]
        ids = [[tok.bos_id] + tok.encode(p) for p in batch_p]
        sampler.horizon(s, steps + 1)               # as `grpo` does: compile only if the run repays it
        groups = sampler.rollout(ids, sp)
        t_roll = time.perf_counter()
        comps = [c for g in groups for c in g]
        texts = tok.decode_batch([c["ids"] for c in comps])
        r = reward(texts, [a for a in batch_a for _ in range(G)])
        adv = group_advantages(torch.tensor(r), G, "group")
        bids, mask, adv, _ = build_batch([i for i in ids for _ in range(G)], comps, adv, tok.eos_id, False, "cpu",
                                         width_multiple("cpu", dtype))
        train_on_batch(sampler, None, opt, bids, mask, adv, cfg, torch.device("cpu"), dtype)
        times.append(time.perf_counter() - t)
        tokens.append(sum(len(c["ids"]) for c in comps))
        if s:                                   # after the warm-up step
            split["rollout_s"] += t_roll - t
            split["update_s"] += time.perf_counter() - t_roll
    split = {k: round(v / steps, 2) for k, v in split.items()}
    split.update(train_dtype=str(dtype).removeprefix("torch."), compiled_buckets=sorted(sampler.engine.runner._compiled))
    return sum(tokens[1:]) / sum(times[1:]), times, split


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="timed steps (plus one warm-up)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--rollout-compile", default="auto", choices=["auto", "warm"],
                    help="auto: the default policy (compile a batch size if the run's remaining steps repay it); "
                         "warm: compile every rollout batch size before the first step (what long runs reach)")
    args = ap.parse_args()
    from nanoseek.common import tune_cpu_allocator
    # what `nanoseek grpo` does at start-up; TRL shares this process and so this allocator
    # (NANOSEEK_MALLOC=system measures glibc's defaults)
    allocator = "tuned" if tune_cpu_allocator() else "system"
    torch.set_num_threads(torch.get_num_threads())
    n = args.prompts * (args.steps + 1)
    pairs = [(10 + i, 20 + 3 * i) for i in range(n)]
    prompts = [f"{a}+{b}=" for a, b in pairs]
    answers = [str(a + b) for a, b in pairs]
    model_dir = build_model_dir(prompts + [f"{p}{a}" for p, a in zip(prompts, answers)] * 5)
    ours, our_times, our_split = run_nanoseek(model_dir, prompts, answers, args.steps, args.G, args.max_new,
                                              args.rollout_compile)
    trl, trl_times, trl_split = run_trl(model_dir, prompts, answers, args.steps, args.G, args.max_new)
    import trl as trl_mod
    from bench_decode import cpu_model
    report("bench_grpo" + ("" if args.rollout_compile == "auto" else "_" + args.rollout_compile) +
           ("" if allocator == "tuned" else "_system_malloc"), {
        "host": cpu_model(), "rollout_compile": args.rollout_compile, "allocator": allocator,
        "completion_tokens_per_s": {"nanoseek": round(ours, 1), "trl": round(trl, 1)},
        "speedup": round(ours / trl, 2), "trl_version": trl_mod.__version__, "nanoseek_mean_split_s": our_split,
        "trl_mean_split_s": trl_split,
        "s_per_step": {"nanoseek": [round(t, 2) for t in our_times], "trl": [round(t, 2) for t in trl_times]},
        "shape": {"prompts_per_step": args.prompts, "G": args.G, "max_new": args.max_new}})


if __name__ == "__main__":
    main()
