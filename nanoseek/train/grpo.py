"""`nanoseek grpo`: pure RL with verifiable rewards (R1-Zero), one visible loop.

    for step:
        prompts  <- task problems (train split)
        rollouts <- G samples per prompt from the inference engine, on the very module we train
                    (no weight sync: the engine holds a reference to the model, not a copy)
        rewards  <- rule-based reward functions (accuracy, format, ...) on the decoded completions
        [dynamic sampling: drop groups whose rewards are all equal, refill with fresh prompts]
        A        <- group-normalised advantages
        mu times: recompute log-probs, clipped token loss (+ beta * k3 KL to a frozen reference),
                  aggregate (grpo | dr_grpo | dapo), AdamW step
        metrics  <- reward, accuracy, length, think / reflection rates ("aha"), clip, KL, entropy ...
        every k  <- greedy accuracy on held-out problems

Policies: nanoseek models sample with our engine (fast, latent cache); HF causal LMs
(`AutoModelForCausalLM`, for users with their own models) sample with `model.generate`.
Old-policy log-probs are computed by the trainer whenever one rollout batch feeds more than one
optimizer step (mu > 1, or several minibatches not accumulated into one step); otherwise the ratio is
exactly 1.
The model stays in eval mode: there is no dropout, and MoE routing statistics are not needed here.
"""
from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import args as argparse_dc
from ..checkpoint.state import load_latest, save_checkpoint
from ..common import (UserError, autocast, autodetect_device, compute_dtype, print0, progress, rng_state,
                      seed_everything, set_rng_state, set_threads)
from ..quant.fp8 import SCALE_FORMATS
from .grpo_loss import LEVELS, LOSS_TYPES, SCALES, group_advantages, grpo_loss, token_logprobs
from .rollout import BACKTRACK, REFLECTION, EngineSampler, evaluate, load_for_sampling, prompt_ids, reflection_stats
from .optim import build_optimizer, clip_grad_norm

@dataclass
class GRPOConfig:
    model: str = field(default="", metadata={"help": "HF-format model directory (nanoseek or any causal LM)"})
    out: str = field(default="runs/grpo", metadata={"help": "run directory"})
    task: str = field(default="arithmetic", metadata={"help": "task: arithmetic, countdown, equations"})
    task_args: str = field(default="", metadata={"help": "task knobs, e.g. 'min_digits=3,max_digits=3'"})
    tasks_file: str | None = field(default=None, metadata={"help": "JSONL of {prompt, answer[, task]} instead of --task"})
    reward: str = field(default="accuracy", metadata={"help": "weighted rewards, e.g. 'accuracy:1,format:0.2'"})
    reward_timeout: float = field(default=10.0, metadata={"help": "seconds a reward may spend on one batch (then on "
                                                                  "each sample); an overrun is a failure, left out of "
                                                                  "the group baseline and counted (0 = no budget)"})
    steps: int = field(default=100, metadata={"help": "RL steps (one rollout batch each)"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts (groups) per step"})
    group_size: int = field(default=8, metadata={"help": "G: samples per prompt"})
    max_new_tokens: int = field(default=64, metadata={"help": "completion length cap"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "rollout nucleus sampling"})
    lr: float = field(default=2e-4, metadata={"help": "learning rate (constant after warmup)"})
    warmup: int = field(default=5, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "global grad-norm clip"})
    beta: float = field(default=0.0, metadata={"help": "k3 KL coefficient to a frozen reference (0: no reference)"})
    eps_low: float = field(default=0.2, metadata={"help": "clip 1 - eps_low"})
    eps_high: float = field(default=0.28, metadata={"help": "clip 1 + eps_high (DAPO clip-higher)"})
    loss_type: str = field(default="dapo", metadata={"help": "loss aggregation", "choices": list(LOSS_TYPES)})
    scale_rewards: str | None = field(default=None, metadata={"help": "advantage std scaling (default: group; none "
                                                                     "with --loss-type dr_grpo, which drops it)",
                                                             "choices": list(SCALES)})
    importance_level: str = field(default="token", metadata={"help": "ratio per token (GRPO) or per sequence (GSPO: "
                                                                      "with --loss-type grpo, a mean over sequences, "
                                                                      "and --eps-low 3e-4 --eps-high 4e-4)",
                                                              "choices": list(LEVELS)})
    rollout_is: str = field(default="off", metadata={"help": "correct for the sampler-vs-trainer mismatch with "
                                                            "importance weights pi_old/pi_rollout per token: "
                                                            "truncate (TIS: min(w, cap)) or mask (MIS: drop tokens "
                                                            "with w > cap); nanoseek models (engine log-probs)",
                                                    "choices": ["off", "truncate", "mask"]})
    rollout_is_cap: float = field(default=2.0, metadata={"help": "the cap C of --rollout-is"})
    mu: int = field(default=1, metadata={"help": "optimisation passes per rollout batch"})
    minibatches: int = field(default=1, metadata={"help": "minibatches per pass over a rollout batch"})
    grad_accum: int = field(default=1, metadata={"help": "minibatches whose gradients are accumulated into one "
                                                         "optimizer step (minibatches / grad_accum steps per pass)"})
    dynamic_sampling: bool = field(default=True, metadata={"help": "drop zero-variance groups and refill (DAPO)"})
    max_refill: int = field(default=2, metadata={"help": "extra rollout rounds to refill dropped groups"})
    mask_truncated: bool = field(default=False, metadata={"help": "no loss on completions cut at max_new_tokens"})
    eval_every: int = field(default=20, metadata={"help": "held-out greedy eval every N steps (0: start and end)"})
    eval_n: int = field(default=200, metadata={"help": "held-out problems per eval"})
    eval_seed: int = field(default=12345, metadata={"help": "seed of the held-out problems"})
    seed: int = field(default=0, metadata={"help": "seed"})
    dtype: str | None = field(default=None, metadata={"help": "training matmul dtype (default: fastest here)"})
    rollout_dtype: str | None = field(default=None, metadata={"help": "rollout compute dtype (default: the fastest "
                                                                      "measured on this host; float32 / bfloat16)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda"})
    compile: str = field(default="auto", metadata={"help": "torch.compile the rollout decode step: auto (once "
                                                            "decoding a batch size has taken as long as compiling "
                                                            "it would), on, off", "choices": ["auto", "on", "off"]})
    max_batch: int = field(default=256, metadata={"help": "engine batch slots"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all)"})
    routing_replay: bool = field(default=False, metadata={"help": "MoE routing replay (R3): the engine records "
                                                                   "each token's experts and the trainer's forwards "
                                                                   "use them (the router still learns from its "
                                                                   "scores); rollouts then decode through the model's "
                                                                   "own forward, slower; nanoseek models"})
    fp8: bool = field(default=False, metadata={"help": "FP8 policy updates (DeepSeek-V3's fine-grained recipe; "
                                                       "rollouts decode in high precision)"})
    fp8_scales: str = field(default="fp32", metadata={"help": "FP8 scale format", "choices": list(SCALE_FORMATS)})
    save_fp8: bool = field(default=False, metadata={"help": "write OUT/final in DeepSeek's FP8 checkpoint format"})
    save_final: bool = field(default=True, metadata={"help": "write OUT/final (HF format)"})
    save_every: int = field(default=0, metadata={"help": "checkpoint (model, optimizer, RNG, step, prompt position) "
                                                         "every N steps (0 = only at the end)"})
    keep: int = field(default=2, metadata={"help": "checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out exactly "
                                                          "(use --compile off for bit-equal rollouts)"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots"})


COMPILE = {"auto": "auto", "on": True, "off": False}


def load_policy(cfg: GRPOConfig, device, questions: list[str]):
    """The policy and its sampler (nanoseek engine or transformers), with the model's own tokenizer."""
    return load_for_sampling(cfg.model, device, questions, cfg.max_new_tokens, seed=cfg.seed,
                             max_batch=max(cfg.max_batch, cfg.group_size), rollout_dtype=cfg.rollout_dtype,
                             compile=COMPILE[cfg.compile], record_routing=cfg.routing_replay)


# -------------------------------------------------------------------------------------------------
# the batch: prompt + completion ids, masks, advantages

def width_multiple(device, dtype: torch.dtype) -> int:
    """What a rollout batch's input length is rounded up to (`build_batch`): 16 for bf16 on CPU, whose
    GEMMs (oneDNN) JIT a kernel per new shape, so shapes must recur from step to step (measured 0.71
    vs 0.40 s per forward + backward); 1 elsewhere, where the rounding is only padding to compute
    (fp32 on the bench_grpo shape, AMD EPYC AVX2: 80 -> 71 positions a row, update 1.58 -> 1.38 s)."""
    return 16 if dtype == torch.bfloat16 and torch.device(device).type == "cpu" else 1


def build_batch(prompts: list[list[int]], completions: list[dict], adv: torch.Tensor, pad_id: int,
                mask_truncated: bool, device, multiple: int = 16):
    """Rows = prompt + completion; `mask` marks target positions that are completion tokens. The input
    length (L - 1) is padded to a `multiple` (`width_multiple`)."""
    seqs = [p + c["ids"] for p, c in zip(prompts, completions)]
    L = -(-(max(len(s) for s in seqs) - 1) // multiple) * multiple + 1
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), L - 1)
    with_logp = all(c.get("logprobs") is not None for c in completions)
    rollout_logp = torch.zeros(len(seqs), L - 1)           # the sampler's log-probs of the tokens it drew
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, : len(seqs[i])] = torch.tensor(seqs[i])
        if not (mask_truncated and c["truncated"]):
            mask[i, len(p) - 1: len(p) - 1 + len(c["ids"])] = 1.0
        if with_logp:
            rollout_logp[i, len(p) - 1: len(p) - 1 + len(c["ids"])] = torch.tensor(c["logprobs"], dtype=torch.float)
    return ids.to(device), mask.to(device), adv.to(device), (rollout_logp.to(device) if with_logp else None)


def build_replay(prompts: list[list[int]], completions: list[dict], L: int, device) -> torch.Tensor | None:
    """The rollouts' recorded experts laid out as the trainer's inputs ids[:, :-1]: (n_moe, N, L-1, K), -1
    where nothing was recorded (padding). None unless every completion carries `routing`."""
    if not completions or any(c.get("routing") is None for c in completions):
        return None
    n_moe, _, K = completions[0]["routing"].shape
    out = torch.full((n_moe, len(completions), L - 1, K), -1, dtype=torch.long)
    for i, c in enumerate(completions):
        r = c["routing"]                                   # (n_moe, prompt + out - 1, K): every input position
        out[:, i, : r.shape[1]] = r
    return out.to(device)


def policy_logprobs(model, ids: torch.Tensor, mask: torch.Tensor, temperature: float, with_entropy=False,
                    replay: torch.Tensor | None = None, records: list | None = None):
    """(N,L) ids -> (N,L-1) log-probs of the next token at masked positions (0 elsewhere).
    nanoseek models: hidden states once, then the head in chunks; HF models: their logits. `replay`
    (n_moe, N, L-1, K): expert ids the MoE layers use instead of their own choice (`build_replay`);
    `records` collects the forward's RoutingRecord, counting how many routes the replay changed."""
    from ..model import Transformer
    from ..model.moe import RoutingRecord

    if isinstance(model, Transformer):
        routing = None
        if replay is not None:
            routing = RoutingRecord([r.reshape(-1, r.shape[-1]) for r in replay], count_changes=records is not None)
            if records is not None:
                records.append(routing)
        hidden, logits_fn = model.hidden(ids[:, :-1], routing=routing), model.logits
    else:
        hidden, logits_fn = model(ids[:, :-1]).logits, (lambda x: x)
    sel = mask.bool()
    res = token_logprobs(logits_fn, hidden[sel], ids[:, 1:][sel], temperature, with_entropy=with_entropy)
    logp, ent = res if with_entropy else (res, None)
    full = torch.zeros(mask.shape, dtype=logp.dtype, device=mask.device)
    full[sel] = logp
    return (full, ent) if with_entropy else full


def make_task(cfg: GRPOConfig):
    from ..data.tasks import make_task as task_of_flags
    return task_of_flags(cfg.task, cfg.task_args, cfg.tasks_file)


# -------------------------------------------------------------------------------------------------
# the loop

def grpo(cfg: GRPOConfig, policy=None, tok=None, rewards=None) -> dict:
    """The run. `rewards`: reward functions `fn(prompts, completions, problems, **kw) -> list[float]`, or
    (fn, weight) pairs, used instead of --reward (which also takes module.path:function entries)."""
    from ..inference.sampling import SamplingParams
    from ..rewards import RewardInputError, build_reward, combine

    for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "mu", "minibatches", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.group_size < 2:
        raise UserError("--group-size must be >= 2: advantages are relative to the group")
    if cfg.reward_timeout < 0:
        raise UserError(f"--reward-timeout {cfg.reward_timeout}: seconds, >= 0 (0 = no time limit)")
    set_threads(cfg.threads or None)
    device = autodetect_device(cfg.device)
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    task = make_task(cfg)
    rng = random.Random(cfg.seed)
    resumed = load_latest(out / "checkpoints") if cfg.resume else None
    pool_size = max(4096, cfg.steps * cfg.prompts_per_step * 2)
    if resumed is not None:
        check_resumable(resumed[0]["config"], cfg)
        pool_size = resumed[0].get("pool_size", pool_size)     # the same prompts in the same order
    pool = task.problems(pool_size, seed=cfg.seed, split="train")
    rng.shuffle(pool)
    held_out = task.problems(cfg.eval_n, seed=cfg.eval_seed, split="test")
    if policy is None:
        policy, model, tok = load_policy(cfg, device, [p.question for p in pool + held_out])
    model = policy.model
    model.eval()
    if cfg.routing_replay and not isinstance(policy, EngineSampler):
        raise UserError("--routing-replay needs a nanoseek (DeepSeek-V3) model: the engine records the experts")
    if cfg.routing_replay and not model.moe_layers():
        raise UserError("--routing-replay: this model has no MoE layer, so there is no routing to replay")
    if cfg.rollout_is != "off" and not isinstance(policy, EngineSampler):
        raise UserError("--rollout-is needs the sampler's log-probs, which only nanoseek models' engine returns; "
                        "drop it for this model")
    if cfg.save_fp8 and not isinstance(policy, EngineSampler):
        raise UserError("--save-fp8 writes DeepSeek's FP8 format, for nanoseek (DeepSeek-V3-format) models only")
    if cfg.fp8:
        from ..quant.fp8 import enable_training
        enable_training(model, cfg.fp8_scales)
    hidden = getattr(getattr(model, "cfg", None), "hidden_size", None) or model.config.hidden_size
    dtype = compute_dtype(device, cfg.dtype, hidden, cfg.prompts_per_step * cfg.group_size * cfg.max_new_tokens)
    try:
        if rewards is not None:
            pairs = [r if isinstance(r, tuple) else (r, 1.0) for r in rewards]
            reward_fn = combine(pairs, timeout_s=cfg.reward_timeout or None)
        else:
            reward_fn = build_reward(cfg.reward, cfg.reward_timeout or None)
    except ValueError as e:
        raise UserError(f"--reward {cfg.reward!r}: {e}" if rewards is None else f"rewards: {e}") from None
    cursor = 0                          # position in the (cyclic) prompt pool: part of the resumable state

    def next_problems(n: int):
        nonlocal cursor
        out_ = [pool[(cursor + i) % len(pool)] for i in range(n)]
        cursor += n
        return out_
    ref = None
    if cfg.beta > 0:
        ref = copy.deepcopy(model).eval().requires_grad_(False)
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, betas=(0.9, 0.99))
    sp = SamplingParams(n=cfg.group_size, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens)
    metrics_path = out / "metrics.jsonl"
    evals = []
    start = 1
    resumed_spare, resumed_short = [], 0
    if cfg.resume and resumed is None:
        print0(f"--resume: no checkpoint in {out / 'checkpoints'}; starting from scratch")
    if resumed is not None:
        state, path = resumed
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        if state.get("sampler_rng") is not None:
            policy.engine.gen.set_state(state["sampler_rng"])
        policy.sync_weights()
        cursor, evals, start = state["cursor"], state["evals"], state["step"] + 1
        resumed_spare, resumed_short = state.get("spare", []), state.get("short_steps", 0)
        keep = [l for l in metrics_path.read_text().splitlines()
                if l.strip() and json.loads(l)["step"] <= state["step"]]
        metrics_path.write_text("".join(l + "\n" for l in keep))
        print0(f"resumed from {path} at step {state['step']}")
    else:
        metrics_path.write_text("")

    def checkpoint(at: int):
        save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                         "sampler_rng": policy.engine.gen.get_state() if isinstance(policy, EngineSampler) else None,
                         "cursor": cursor, "pool_size": pool_size, "evals": evals, "spare": spare,
                         "short_steps": short_steps, "step": at,
                         "config": asdict(cfg)},
                        out / "checkpoints", at, keep=cfg.keep)

    # the engine compiles a decode bucket only if what is left of its kind of work repays it: training
    # rollouts count GRPO steps, evaluations count evaluations (they run every eval_every steps)
    n_evals = (0 if evals else 1) + 1 + sum(1 for s in range(start, cfg.steps)
                                            if cfg.eval_every and s % cfg.eval_every == 0)
    evals_run = 0

    def run_eval(at: int):
        nonlocal evals_run
        policy.horizon(evals_run, n_evals, "eval")
        evals_run += 1
        r = evaluate(policy, tok, held_out, cfg.max_new_tokens, seed=cfg.eval_seed)
        r["step"] = at
        evals.append(r)
        with metrics_path.open("a") as f:
            f.write(json.dumps({"step": at, **{f"eval_{k}": v for k, v in r.items() if k != "step"}}) + "\n")
        print0(f"eval @ step {at}: held-out greedy accuracy {r['accuracy']:.3f}, think rate {r['think_rate']:.2f}, "
               f"mean length {r['mean_length']:.1f}")
        return r

    spare: list = list(resumed_spare)   # groups with a signal beyond this step's batch, for the next one
    short_steps, warned_short = resumed_short, False
    if not evals:
        run_eval(0)
    bar = progress(total=cfg.steps, initial=start - 1, desc="grpo")
    t_start = time.perf_counter()
    for step in range(start, cfg.steps + 1):
        t0 = time.perf_counter()
        lr_now = cfg.lr * min(1.0, step / max(1, cfg.warmup))
        # ---- rollouts (+ dynamic sampling) -----------------------------------------------------
        kept_prompts, kept_comps, kept_rewards = [], [], []
        n_carried = min(len(spare), cfg.prompts_per_step)      # surplus groups of the last step come first
        for p_ids, group, rewards in spare[:n_carried]:
            kept_prompts += [p_ids] * cfg.group_size
            kept_comps += group
            kept_rewards += rewards
        spare.clear()                # at most one step old: older ones would be too far off-policy
        n_groups = n_zero_std = 0
        all_comps, all_rewards, comps_text, components, failures = [], [], [], {}, {}
        for round_ in range(1 + (cfg.max_refill if cfg.dynamic_sampling else 0)):
            need = cfg.prompts_per_step - len(kept_prompts) // cfg.group_size
            if need <= 0:
                break
            probs = next_problems(need if round_ == 0 else max(need, cfg.prompts_per_step // 2))
            prompts = [prompt_ids(tok, p.question) for p in probs]
            policy.horizon(step - start, cfg.steps - start + 1)
            groups = policy.rollout(prompts, sp)
            flat = [c for g in groups for c in g]
            texts = [tok.decode(c["ids"]) for c in flat]
            G = cfg.group_size
            try:
                scores = reward_fn.score([tok.decode(p) for p in prompts for _ in range(G)], texts,
                                         [p for p in probs for _ in range(G)],
                                         completion_lengths=[len(c["ids"]) for c in flat],
                                         truncated=[c["truncated"] for c in flat])
            except RewardInputError as e:          # a wiring problem, not a bad sample
                raise UserError(f"--reward {cfg.reward!r}: {e}") from None
            rewards_flat = scores.total                       # NaN where a reward failed
            for k, v in scores.components.items():
                components.setdefault(k, []).extend(v)
            for k, v in scores.failures.items():
                failures[k] = failures.get(k, 0) + v
            all_comps += flat
            all_rewards += rewards_flat
            comps_text += texts
            for i, (prob, p_ids, group) in enumerate(zip(probs, prompts, groups)):
                rewards = rewards_flat[i * G: (i + 1) * G]
                scored = [r for r in rewards if not math.isnan(r)]
                n_groups += 1
                if len(scored) < 2 or max(scored) - min(scored) < 1e-9:
                    n_zero_std += 1
                    if cfg.dynamic_sampling:
                        continue
                if len(kept_prompts) // G >= cfg.prompts_per_step:
                    if group[0].get("logprobs") is not None:   # carried groups need their sampler's log-probs
                        spare.append((p_ids, group, rewards))
                    continue
                kept_prompts += [p_ids] * G
                kept_comps += group
                kept_rewards += rewards
        t_gen = time.perf_counter() - t0
        comp_tokens = sum(len(c["ids"]) for c in all_comps)
        scored = [r for r in all_rewards if not math.isnan(r)] or [0.0]
        rec = {"step": step, "reward": float(np.mean(scored)), "reward_std": float(np.std(scored)),
               "reward_failures": sum(failures.values()),
               "frac_zero_std": n_zero_std / max(1, n_groups), "groups_trained": len(kept_prompts) // cfg.group_size,
               "groups_carried": n_carried,
               "completion_len": comp_tokens / max(1, len(all_comps)),
               "think_rate": float(np.mean(["<think>" in t for t in comps_text])),
               "backtrack_rate": float(np.mean([bool(BACKTRACK.search(t)) for t in comps_text])),
               "truncated_frac": float(np.mean([c["truncated"] for c in all_comps]))}
        for k, v in components.items():
            rec[f"reward_{k}"] = float(np.mean(v)) if v else 0.0
        right = components.get("accuracy") or [r > 0.5 for r in all_rewards]
        rec.update({k: v for k, v in reflection_stats([bool(REFLECTION.search(t)) for t in comps_text],
                                                      [bool(c) for c in right]).items() if v is not None})
        # ---- update ----------------------------------------------------------------------------
        t1 = time.perf_counter()
        trained = len(kept_prompts) // cfg.group_size
        if trained < cfg.prompts_per_step:
            short_steps += 1
            if not warned_short:
                warned_short = True
                print0(f"warning: step {step}: only {trained} of {cfg.prompts_per_step} groups had a reward signal "
                       f"after "
                       f"{cfg.max_refill} refill rounds ({n_zero_std} of {n_groups} groups all-equal); such steps "
                       f"train at lr x {trained}/{cfg.prompts_per_step} and are counted (short_steps). Raise "
                       f"--max-refill, or make the task easier/harder so groups disagree")
        for g in opt.param_groups:       # a partial batch is a noisier gradient: a proportionally smaller step
            g["lr"] = lr_now * trained / cfg.prompts_per_step
        rec["short_steps"] = short_steps
        if kept_prompts:
            adv = group_advantages(torch.tensor(kept_rewards), cfg.group_size, scale_rewards(cfg))
            ids, mask, adv, rollout_logp = build_batch(kept_prompts, kept_comps, adv, tok.eos_id, cfg.mask_truncated,
                                                       device, width_multiple(device, dtype))
            carried = torch.arange(ids.shape[0], device=ids.device) < n_carried * cfg.group_size
            replay = build_replay(kept_prompts, kept_comps, ids.shape[1], device) if cfg.routing_replay else None
            if cfg.routing_replay and replay is None:
                raise RuntimeError("--routing-replay: the sampler recorded no experts for this batch")
            stats = train_on_batch(policy, ref, opt, ids, mask, adv, cfg, device, dtype, rollout_logp, carried,
                                   replay=replay)
            rec.update(stats)
        t_train = time.perf_counter() - t1
        rec.update({"gen_s": round(t_gen, 3), "train_s": round(t_train, 3),
                    "completion_tokens": comp_tokens,
                    "tokens_per_s": round(comp_tokens / (time.perf_counter() - t0), 1)})
        with metrics_path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update(1)
        bar.set_postfix(reward=f"{rec['reward']:.2f}", think=f"{rec['think_rate']:.2f}",
                        len=f"{rec['completion_len']:.0f}")
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            run_eval(step)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            checkpoint(step)
    bar.close()
    final_eval = run_eval(cfg.steps)
    policy.clear_horizon()
    checkpoint(cfg.steps)
    summary = {"accuracy_before": evals[0]["accuracy"], "accuracy_after": final_eval["accuracy"],
               "think_rate_before": evals[0]["think_rate"], "think_rate_after": final_eval["think_rate"],
               "length_before": evals[0]["mean_length"], "length_after": final_eval["mean_length"],
               "seconds": round(time.perf_counter() - t_start, 1), "steps": cfg.steps, "short_steps": short_steps}
    if cfg.save_final:
        final = out / "final"
        from ..checkpoint.hf import save_pretrained
        save_pretrained(model, final, tokenizer=tok, fp8=cfg.save_fp8)
        summary["final_model"] = str(final)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plots:
        from .plots import plot_grpo
        plot_grpo(metrics_path, out / "plots" / "grpo.png")
    print0(f"done: held-out accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}")
    return summary


RESUME_FIXED = ("task", "task_args", "tasks_file", "seed", "group_size", "prompts_per_step", "reward", "max_new_tokens",
                "temperature", "top_p")


def check_resumable(saved: dict, cfg: GRPOConfig) -> None:
    """A resumed run must draw the same prompts and score them the same way (--steps, --lr and the like
    may change)."""
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != getattr(cfg, k)]
    if changed:
        k = changed[0]
        raise UserError(f"--resume: --{k.replace('_', '-')} was {saved[k]!r} in the checkpoint and is "
                        f"{getattr(cfg, k)!r} now; resume with the same value (or start a new --out)")


def scale_rewards(cfg: GRPOConfig) -> str:
    """Dr. GRPO removes both biases of GRPO: the length normalisation (its loss) and the std scaling."""
    return cfg.scale_rewards or ("none" if cfg.loss_type == "dr_grpo" else "group")


def update_plan(n_rows: int, minibatches: int, grad_accum: int) -> list[list[torch.Tensor]]:
    """One pass over a rollout batch of n_rows: optimizer steps, each a list of minibatches (row indices).
    Minibatches are as even as possible (sizes differ by at most one row); the last step may hold fewer
    than grad_accum of them."""
    mbs = [mb for mb in torch.arange(n_rows).tensor_split(min(minibatches, n_rows)) if mb.numel()]
    return [mbs[i: i + grad_accum] for i in range(0, len(mbs), grad_accum)]


def rollout_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, mode: str, cap: float):
    """Per-token importance weights pi_old / pi_rollout for the sampler-vs-trainer mismatch (the engine
    decodes in another precision, with other kernels): truncated at `cap` (TIS) or zeroed above it (MIS).
    Returns (weights, share of tokens the cap acted on)."""
    w = (old_logp - rollout_logp).clamp(-20, 20).exp()
    over = w > cap
    w = w.clamp(max=cap) if mode == "truncate" else torch.where(over, torch.zeros_like(w), w)
    return w.detach(), over


def train_on_batch(policy, ref, opt, ids, mask, adv, cfg: GRPOConfig, device, dtype, rollout_logp=None,
                   carried=None, replay=None) -> dict:
    """mu passes over the rollout batch, each `update_plan` optimizer steps. Whenever the batch feeds more
    than one optimizer step, later minibatches are off-policy (the weights moved since the rollout), so
    the old policy's log-probs are computed once, before the first step, and the ratio is the true one.
    Rows carried over from the previous step (`carried`, (N,) bool) were sampled by the previous policy:
    their old log-probs are the sampler's own. Each step's loss is normalised by the tokens (sequences)
    of the minibatches it accumulates, not by an assumed equal share. `replay` (routing replay): the
    rollouts' experts, used by every forward here (policy, old policy, reference)."""
    N, max_len = ids.shape[0], cfg.max_new_tokens
    plan = update_plan(N, cfg.minibatches, cfg.grad_accum)
    carried = carried if carried is not None and carried.any() else None
    off_policy = cfg.mu * len(plan) > 1 or carried is not None
    use_is = cfg.rollout_is != "off"
    if use_is and rollout_logp is None:
        raise UserError("--rollout-is needs the sampler's log-probs, which only nanoseek models' engine returns")
    old_logp = ref_logp = is_w = None
    stats_acc: dict[str, list] = {}
    def rep(mb):
        return replay[:, mb] if replay is not None else None

    def in_minibatches(model):          # no-grad log-probs, one minibatch at a time (as memory allows)
        return torch.cat([policy_logprobs(model, ids[mb], mask[mb], cfg.temperature, replay=rep(mb))
                          for st_ in plan for mb in st_])

    with torch.no_grad(), autocast(device, dtype):
        if off_policy or use_is:
            old_logp = in_minibatches(policy.model)
        fresh_logp = old_logp
        if carried is not None:
            old_logp = torch.where(carried.unsqueeze(1), rollout_logp, old_logp)
        if use_is:
            is_w, over = rollout_weights(old_logp, rollout_logp, cfg.rollout_is, cfg.rollout_is_cap)
            stats_acc["rollout_is_capped"] = [float((over & mask.bool()).sum() / mask.sum().clamp(min=1))]
        if ref is not None:
            ref_logp = in_minibatches(ref)
    for pass_ in range(cfg.mu):
        for step_i, step_mbs in enumerate(plan):
            rows = torch.cat(step_mbs)
            n_tokens, n_seqs = mask[rows].sum().clamp(min=1), rows.numel()
            losses = []
            for mb in step_mbs:
                with autocast(device, dtype):
                    recs: list = []
                    logp, ent = policy_logprobs(policy.model, ids[mb], mask[mb], cfg.temperature, with_entropy=True,
                                                replay=rep(mb), records=recs)
                    old = old_logp[mb] if old_logp is not None else logp.detach()
                    loss, st = grpo_loss(logp, old, adv[mb], mask[mb], cfg.eps_low, cfg.eps_high, cfg.beta,
                                         ref_logp[mb] if ref_logp is not None else None, cfg.loss_type, max_len,
                                         n_tokens=n_tokens, n_seqs=n_seqs, level=cfg.importance_level,
                                         is_weight=is_w[mb] if is_w is not None else None)
                if rollout_logp is not None and pass_ == 0:     # how far the sampler's log-probs are from the trainer's
                    sel = mask[mb].bool()                           # (rows sampled by this policy only)
                    if carried is not None:
                        sel &= ~carried[mb].unsqueeze(1)
                    trainer = fresh_logp[mb] if fresh_logp is not None else logp.detach()
                    gap = (trainer[sel] - rollout_logp[mb][sel]).abs()
                    st["rollout_logp_gap"] = float(gap.mean()) if sel.any() else 0.0
                if recs and pass_ == 0 and step_i == 0:   # routes where the sampler's experts differ from the
                                                          # trainer's (before any step moves the weights)
                    st["routing_replay_changed"] = recs[0].changed_rows / max(1, recs[0].replayed_rows)
                loss.backward()
                losses.append(loss.item())
                st["entropy"] = float(ent.mean()) if ent.numel() else 0.0
                for k, v in st.items():
                    stats_acc.setdefault(k, []).append(v)
            gn = clip_grad_norm(policy.model, cfg.grad_clip)
            if math.isfinite(gn):
                opt.step()
                policy.sync_weights()         # the sampler's derived decode weights follow the step
            opt.zero_grad(set_to_none=True)
            stats_acc.setdefault("loss", []).append(sum(losses))
            stats_acc.setdefault("grad_norm", []).append(gn)
    out = {k: float(np.mean(v)) for k, v in stats_acc.items()}
    for k in ("ratio_min", "ratio_max"):              # extremes over the whole update, not means
        if k in stats_acc:
            out[k] = float((min if k == "ratio_min" else max)(stats_acc[k]))
    out["optimizer_steps"] = cfg.mu * len(plan)
    return out


train = grpo          # nanoseek.train.grpo.train(cfg, rewards=[fn, ...])


def main(argv=None) -> None:
    cfg = argparse_dc.parse(GRPOConfig, argv, prog="nanoseek grpo", description=__doc__.splitlines()[0])
    if not cfg.model:
        raise UserError("--model is required (an HF-format model directory, e.g. runs/pretrain/final)")
    grpo(cfg)
