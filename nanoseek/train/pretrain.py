"""`nanoseek pretrain`: pretrain a DeepSeek-V3-architecture model, top to bottom in one loop.

    tokenizer (trained on the corpus, or given) -> documents -> packed batches ->
    for step: forward (main + MTP heads) -> loss = CE + lambda * MTP + balance terms -> backward ->
              clip -> AdamW -> auxiliary-loss-free bias update -> metrics / val / checkpoint
    -> OUT/final (HF format + tokenizer), OUT/metrics.jsonl, OUT/plots/pretrain.png

Balancing (`--balance`): `bias` is V3's auxiliary-loss-free rule (b_i += gamma * sign(mean - load_i)
after every step, selection only), optionally with the tiny sequence-wise loss (`--seq-aux-alpha`,
1e-4 in V3); `aux` is the classic batch-level auxiliary loss (`--aux-alpha`); `none` turns both off.
Metrics per MoE layer include `max_violation` = max load / mean load - 1.

Resume: `--resume` continues from the newest complete checkpoint in OUT/checkpoints with the same
data order, RNG state and optimizer state, so the per-step losses equal an uninterrupted run's.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import args as argparse_dc
from ..checkpoint.hf import save_pretrained
from ..checkpoint.state import load_latest, save_checkpoint
from ..common import (UserError, autocast, autodetect_device, compute_dtype, print0, progress, rank, rng_state,
                      seed_everything, set_rng_state, set_threads)
from ..config import load_preset
from ..data.corpus import load_documents, synthetic_documents
from ..data.loader import PackedLoader, document_mask, fixed_batches
from ..distributed.mesh import PP_SCHEDULES
from ..model import Transformer
from ..model.transformer import moe_layer_id
from ..model.moe import max_violation, update_bias
from ..quant.fp8 import SCALE_FORMATS
from .compiled import StepCompiler
from .losses import balance_share, forward_losses, head_losses, loss_norm
from .optim import MOMENTS, build_optimizer, clip_grad_norm, lr_at, set_lr, state_bytes


@dataclass
class PretrainConfig:
    preset: str = field(default="tiny", metadata={"help": "model preset (tiny, mini, small, ...) or config.json"})
    out: str = field(default="runs/pretrain", metadata={"help": "run directory"})
    max_steps: int = field(default=200, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-batch"})
    seq_len: int = field(default=128, metadata={"help": "tokens per sequence"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    lr: float = field(default=3e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr as a fraction of --lr"})
    schedule: str = field(default="cosine", metadata={"help": "lr schedule", "choices": ["cosine", "wsd", "constant"]})
    warmup: int = field(default=20, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=1.0, metadata={"help": "global grad-norm clip (0 = off)"})
    dtype: str | None = field(default=None, metadata={"help": "matmul dtype: float32 | bfloat16 (default: fastest here)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda (default: autodetect)"})
    compile: str = field(default="auto", metadata={"help": "torch.compile the blocks: auto (when the run is long "
                                                            "enough to repay it), on, off (bit-exact reruns)",
                                                    "choices": ["auto", "on", "off"]})
    recompute: bool = field(default=False, metadata={"help": "activation checkpointing: keep each block's input "
                                                             "only and recompute the block in backward (less "
                                                             "memory, ~one more forward of time)"})
    seed: int = field(default=0, metadata={"help": "seed for init, data order and the synthetic corpus"})
    data: str | None = field(default=None, metadata={"help": ".txt/.jsonl/.parquet file or directory (default: synthetic)"})
    task: str = field(default="arithmetic", metadata={"help": "synthetic corpus: arithmetic, countdown, equations or mix"})
    n_docs: int = field(default=40000, metadata={"help": "synthetic documents to generate"})
    p_worked: float = field(default=0.2, metadata={"help": "share of synthetic documents with a worked <think> trace"})
    p_guess: float = field(default=0.0, metadata={"help": "share of worked traces that open with a quick answer"})
    p_recheck: float = field(default=0.0, metadata={"help": "share of those quick answers re-evaluated: "
                                                             "'wait, check: ...' and worked out"})
    p_slip: float = field(default=0.0, metadata={"help": "share of worked traces with a slip (a dropped carry)"})
    p_catch: float = field(default=0.0, metadata={"help": "share of slips the writer notices and repairs "
                                                           "('wait, check ...'): the seed of reflection"})
    task_args: str = field(default="", metadata={"help": "synthetic corpus: task knobs, e.g. "
                                                          "'n_numbers=3,max_number=9' (arithmetic: --min-digits/"
                                                          "--max-digits when empty)"})
    min_digits: int = field(default=1, metadata={"help": "arithmetic corpus: smallest operand size in digits"})
    max_digits: int = field(default=3, metadata={"help": "arithmetic corpus: largest operand size in digits"})
    tokenizer: str | None = field(default=None, metadata={"help": "existing tokenizer directory (default: train one)"})
    vocab_size: int = field(default=512, metadata={"help": "BPE vocabulary size when training a tokenizer"})
    loss_on: str = field(default="all", metadata={"help": "tokens that carry loss: all, or assistant (the responses "
                                                           "of chat-formatted documents)", "choices": ["all", "assistant"]})
    doc_mask: bool = field(default=True, metadata={"help": "attend within each packed document only, positions "
                                                             "restarting at its BOS (as at inference)"})
    mtp_lambda: float = field(default=0.3, metadata={"help": "weight of the MTP loss (0 = off)"})
    balance: str = field(default="bias", metadata={"help": "expert balancing", "choices": ["bias", "aux", "none"]})
    bias_gamma: float = field(default=1e-3, metadata={"help": "bias update speed gamma (--balance bias)"})
    seq_aux_alpha: float = field(default=1e-4, metadata={"help": "sequence-wise balance loss alpha (--balance bias)"})
    aux_alpha: float = field(default=1e-2, metadata={"help": "classic auxiliary loss alpha (--balance aux)"})
    eval_every: int = field(default=50, metadata={"help": "validation every N steps (0 = only at the end)"})
    val_batches: int = field(default=4, metadata={"help": "validation batches"})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    keep: int = field(default=2, metadata={"help": "checkpoints to keep"})
    resume: bool = field(default=False, metadata={"help": "continue from the newest checkpoint in --out"})
    max_bad_steps: int = field(default=5, metadata={"help": "stop after this many non-finite steps in a row"})
    fp8: bool = field(default=False, metadata={"help": "FP8 training: DeepSeek-V3's fine-grained recipe (1x128 "
                                                       "activation tiles, 128x128 weight blocks) on every block "
                                                       "linear and expert (nanoseek/quant/fp8.py)"})
    fp8_scales: str = field(default="fp32", metadata={"help": "FP8 scale format: fp32, or ue8m0 (powers of two)",
                                                       "choices": list(SCALE_FORMATS)})
    adam_moments: str = field(default="float32", metadata={"help": "AdamW moment storage (bfloat16 halves the "
                                                                    "optimizer state, as in V3)",
                                                            "choices": list(MOMENTS)})
    save_fp8: bool = field(default=False, metadata={"help": "write OUT/final in DeepSeek's FP8 checkpoint format "
                                                            "(e4m3 weights + 128x128 weight_scale_inv)"})
    dp_shard: int = field(default=1, metadata={"help": "FSDP2: shard parameters, gradients and AdamW state over "
                                                        "N data-parallel ranks (ZeRO-3); needs torchrun"})
    zero: int = field(default=3, metadata={"help": "with --dp-shard: 3 reshards parameters after forward, 2 keeps "
                                                   "them gathered until backward", "choices": [2, 3]})
    ep: int = field(default=1, metadata={"help": "expert parallelism: split the routed experts over N ranks "
                                                 "(all-to-all dispatch/combine); needs torchrun"})
    ep_placement: str | None = field(default=None, metadata={"help": "with --ep: expert placement JSON from "
                                                                   "`nanoseek eplb --run OUT --ranks EP --redundant 0` "
                                                                   "(applied at start or on --resume)"})
    pp: int = field(default=1, metadata={"help": "pipeline parallelism over N ranks; needs torchrun"})
    pp_schedule: str = field(default="dualpipev", metadata={"help": "pipeline schedule (V-shaped ones keep "
                                                                    "embedding and head on one rank, as MTP needs)",
                                                            "choices": list(PP_SCHEDULES)})
    pp_microbatches: int = field(default=0, metadata={"help": "micro-batches per pipeline step (0 = one per stage)"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all cores)"})
    plots: bool = field(default=True, metadata={"help": "write PNG plots at the end"})


# -------------------------------------------------------------------------------------------------
# pieces

def prepare_tokenizer(cfg: PretrainConfig, docs: list[str], out: Path, distributed: bool = False):
    """The given tokenizer, the run's (on resume), or one trained on the corpus. Under torchrun every
    rank trains the same one (BPE training is deterministic) and rank 0 writes it."""
    from ..tokenizer import Tokenizer

    tok_dir = out / "tokenizer"
    if cfg.tokenizer:
        return Tokenizer.load(cfg.tokenizer)
    if (tok_dir / "tokenizer.json").exists() and cfg.resume:
        return Tokenizer.load(tok_dir)
    print0(f"training a {cfg.vocab_size}-token BPE tokenizer on {min(len(docs), 20000):,} documents")
    tok = Tokenizer.train(docs[:20000], vocab_size=cfg.vocab_size)
    if not distributed or rank() == 0:
        tok.save(tok_dir)
    return tok


def encode_docs(tok, docs: list[str]) -> list[np.ndarray]:
    return [np.asarray(ids, dtype=np.int32) for ids in tok.encode_batch(docs)]


def assistant_masks(tok, docs: list[np.ndarray]) -> list[np.ndarray]:
    """1 on the tokens after each <｜Assistant｜> up to and including the EOS that closes the reply,
    0 elsewhere: the user turn (here a problem's random operands) carries no loss. Documents without
    an assistant turn are trained on everywhere."""
    out = []
    for ids in docs:
        if not (ids == tok.assistant_id).any():
            out.append(np.ones(len(ids), dtype=np.uint8))
            continue
        m = np.zeros(len(ids), dtype=np.uint8)
        inside = False
        for i, t in enumerate(ids.tolist()):
            if inside:
                m[i] = 1
                inside = t != tok.eos_id
            elif t == tok.assistant_id:
                inside = True
        out.append(m)
    return out


def build_documents(cfg: PretrainConfig) -> tuple[list[str], list[str]]:
    if cfg.data:
        docs = load_documents(cfg.data)
        n_val = max(1, len(docs) // 50)
        return docs[:-n_val] if len(docs) > 1 else docs, docs[-n_val:]
    from ..data.tasks import parse_knobs

    if cfg.task_args:
        knobs = parse_knobs(cfg.task_args)
    else:
        knobs = {"min_digits": cfg.min_digits, "max_digits": cfg.max_digits} if cfg.task == "arithmetic" else {}
    extra = dict(p_slip=cfg.p_slip, p_catch=cfg.p_catch, p_guess=cfg.p_guess, p_recheck=cfg.p_recheck, **knobs)
    train = synthetic_documents(cfg.n_docs, cfg.seed, cfg.task, cfg.p_worked, split="train", **extra)
    val = synthetic_documents(max(256, cfg.n_docs // 50), cfg.seed + 1, cfg.task, cfg.p_worked, split="test", **extra)
    return train, val


@torch.no_grad()
def evaluate(model: Transformer, batches: list[torch.Tensor], device, dtype, doc_mask: bool = False) -> float:
    """Mean next-token loss over fixed batches; a batch may be (ids, loss mask)."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for b in batches:
        b, m = (b[0].to(device), b[1].to(device)) if isinstance(b, tuple) else (b.to(device), None)
        y = b[:, 1:] if m is None else b[:, 1:].masked_fill(m[:, 1:] == 0, -100)
        positions, attn = document_mask(b[:, :-1], model.cfg.bos_token_id) if doc_mask else (None, None)
        with autocast(device, dtype):
            logits = model.logits(model.hidden(b[:, :-1], positions, mask=attn))
        total += F.cross_entropy(logits.float().flatten(0, 1), y.reshape(-1), reduction="sum",
                                 ignore_index=-100).item()
        n += int((y != -100).sum())
    model.train(was_training)
    return total / max(n, 1)


# -------------------------------------------------------------------------------------------------
# the loop

def pretrain(cfg: PretrainConfig) -> dict:
    for name in ("max_steps", "batch_size", "seq_len", "grad_accum"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1 (got {getattr(cfg, name)})")
    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        raise UserError(f"--lr must be a positive number (got {cfg.lr})")
    if cfg.fp8_scales not in SCALE_FORMATS:          # (checked again where used; here before any work)
        raise UserError(f"--fp8-scales {cfg.fp8_scales!r}: choose one of {', '.join(SCALE_FORMATS)}")
    if cfg.adam_moments not in MOMENTS:
        raise UserError(f"--adam-moments {cfg.adam_moments!r}: choose one of {', '.join(MOMENTS)}")
    from ..distributed.mesh import layout_from_env
    layout = layout_from_env("pretrain", cfg.dp_shard, cfg.ep, cfg.pp, cfg.pp_schedule, cfg.pp_microbatches)
    if cfg.ep_placement and (layout is None or layout.ep < 2):
        raise UserError("--ep-placement places experts over expert-parallel ranks: add --ep N and launch with "
                        "torchrun")
    set_threads(cfg.threads or None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    device = autodetect_device(cfg.device)
    seed_everything(cfg.seed)

    t0 = time.perf_counter()
    train_docs, val_docs = build_documents(cfg)
    tok = prepare_tokenizer(cfg, train_docs, out, layout is not None)
    train_ids, val_ids = encode_docs(tok, train_docs), encode_docs(tok, val_docs)
    train_masks = assistant_masks(tok, train_ids) if cfg.loss_on == "assistant" else None
    n_tok = sum(len(d) for d in train_ids)
    print0(f"data: {len(train_docs):,} documents, {n_tok:,} tokens ({time.perf_counter() - t0:.1f}s)")

    mcfg = load_preset(cfg.preset, vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    if mcfg.max_position_embeddings < cfg.seq_len:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the preset's max_position_embeddings "
                        f"{mcfg.max_position_embeddings}")
    dtype = compute_dtype(device, cfg.dtype, mcfg.hidden_size, cfg.batch_size * cfg.seq_len)
    model = Transformer(mcfg).init_weights(cfg.seed).to(device).train()
    n_params, n_mtp = model.num_params(), model.num_params(True) - model.num_params()
    par = pipe = placements = None
    if layout is not None:       # nanoseek/distributed applies the layout from outside the model
        from ..distributed.mesh import check_layout, init
        from ..distributed.parallelize import Parallel

        check_layout(layout, mcfg, cfg.batch_size, cfg.mtp_lambda > 0 and mcfg.num_nextn_predict_layers > 0)
        d = init(layout, device)
        device = d.device
        model.to(device)                  # (cuda:LOCAL_RANK under torchrun)
        if layout.pp > 1:
            from ..distributed.pipeline import prune
            prune(model, layout, d.pp_rank)
    if cfg.fp8:
        from ..quant.fp8 import enable_training
        enable_training(model, cfg.fp8_scales)
    if layout is not None:
        if cfg.ep_placement:
            from ..distributed.expert_parallel import load_placement
            placements = load_placement(cfg.ep_placement, layout.ep, mcfg)
        par = Parallel(d, model, dtype, zero2=cfg.zero == 2, placements=placements)
        print0(f"distributed: {par.describe()}")
        if layout.pp > 1:
            from ..distributed.pipeline import PipelineStep
            pipe = PipelineStep(model, d, cfg, par.loss_scale, head_losses, balance_share,
                                (cfg.batch_size // layout.dp // layout.microbatches, cfg.seq_len, mcfg.hidden_size))
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, moments=cfg.adam_moments)
    loader = PackedLoader(train_ids, cfg.batch_size, cfg.seq_len, seed=cfg.seed, masks=train_masks)
    val_batches = fixed_batches(val_ids, cfg.batch_size, cfg.seq_len, cfg.val_batches,
                                assistant_masks(tok, val_ids) if train_masks is not None else None)
    if pipe is not None and val_batches:
        print0("--pp: validation runs once, on the gathered model at the end")
    step, expert_load = 0, {}          # expert_load: {MoE layer id: routed tokens per expert so far}
    if cfg.resume:
        step, expert_load = _resume(out, model, opt, loader, par)
    metrics_path = out / "metrics.jsonl"
    if rank() == 0:
        _truncate_metrics(metrics_path, step)

    print0(f"model: {mcfg.name}, {n_params:,} params (+{n_mtp:,} MTP), "
           f"device {device}, matmuls in {str(dtype).removeprefix('torch.')}, "
           f"{cfg.batch_size * cfg.seq_len * cfg.grad_accum:,} tokens/step")

    def checkpoint(at: int):
        train_state = {"data": loader.state_dict(), "rng": rng_state(), "step": at, "config": asdict(cfg),
                       "model_config": mcfg.to_dict(), "expert_load": expert_load}
        if rank() == 0 and expert_load:
            write_expert_load(out / "expert_load.json", expert_load, at)
        if par is None:
            save_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(), **train_state},
                            out / "checkpoints", at, keep=cfg.keep)
        else:
            from ..distributed import checkpoint as dcp_ckpt
            dcp_ckpt.save(out / "checkpoints" / f"step_{at:06d}", model, opt, par, train_state, keep=cfg.keep)

    if cfg.recompute:
        if par is not None or pipe is not None:
            raise UserError("--recompute is tested in one process only so far; drop it with --fsdp/--ep/--pp")
        from .recompute import checkpoint_blocks
        print0(f"recompute: {checkpoint_blocks(model)} blocks keep only their inputs for backward")
    compile_policy = cfg.compile
    if par is not None and compile_policy != "off":
        compile_policy = "off"
        print0("distributed: the training step runs eager (torch.compile under FSDP/EP/pipelining is not wired yet)")
    compiler = StepCompiler(model, compile_policy, f"{mcfg.name}|{mcfg.hidden_size}x{mcfg.num_hidden_layers}|"
                            f"{cfg.batch_size}x{cfg.seq_len}|{str(dtype).removeprefix('torch.')}|mtp{cfg.mtp_lambda > 0}"
                            f"{'|fp8' if cfg.fp8 else ''}")
    bad_in_a_row, skipped = 0, 0
    memory = None
    bar = progress(total=cfg.max_steps, initial=step, desc="pretrain")
    with _open_metrics(metrics_path) as mf:
        while step < cfg.max_steps:
            t_step = time.perf_counter()
            lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.schedule, cfg.warmup, cfg.min_lr_ratio)
            set_lr(opt, lr)
            micro = []
            for _ in range(cfg.grad_accum):
                batch = loader.next_batch()
                batch, mask = (batch[0], batch[1]) if train_masks is not None else (batch, None)
                micro.append((batch, mask))
            norm = loss_norm(micro, cfg, mcfg.bos_token_id, mcfg.num_nextn_predict_layers if cfg.mtp_lambda > 0 else 0)
            logs: dict[str, float] = {}
            finite = True
            for batch, mask in micro:
                if par is not None:
                    batch, mask = par.local_rows(batch), (par.local_rows(mask) if mask is not None else None)
                batch, mask = batch.to(device), (mask.to(device) if mask is not None else None)
                with autocast(device, dtype):
                    if pipe is not None:
                        shares = pipe.run(batch, mask, norm)
                    else:
                        losses = forward_losses(model, batch, cfg, mask, norm)
                        shares = {k: v.item() for k, v in losses.items() if k != "total"}
                if pipe is None:
                    if par is None and not torch.isfinite(losses["total"]):
                        finite = False     # one process: skip the backward; with several, all ranks must run it
                        break
                    (losses["total"] * (par.loss_scale if par is not None else 1.0)).backward()
                for k, v in shares.items():
                    logs[k] = logs.get(k, 0.0) + v
            if par is not None:
                logs = par.reduce_logs(logs)
                finite = all(math.isfinite(v) for v in logs.values())
                par.sync_grads()
                grad_norm = par.clip_grad_norm(cfg.grad_clip)
            else:
                grad_norm = clip_grad_norm(model, cfg.grad_clip) if finite else float("nan")
            if finite and math.isfinite(grad_norm):
                opt.step()
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                skipped += 1
                print0(f"warning: step {step}: non-finite loss or gradient; update skipped ({skipped} so far)")
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise UserError(f"stopping: {bad_in_a_row} non-finite steps in a row at step {step}. "
                                    "Lower --lr, raise --warmup or use --dtype float32.")
            if memory is None:
                memory = state_bytes(model, opt)
            opt.zero_grad(set_to_none=True)
            gamma = cfg.bias_gamma if cfg.balance == "bias" and finite else 0.0
            moes = model.moe_layers()
            if par is not None:
                par.reduce_expert_load(moes)
            by_layer = moe_layer_loads(model, [update_bias(m, gamma) for m in moes], par)
            loads = list(by_layer.values())
            for i, l in by_layer.items():
                expert_load[i] = expert_load.get(i, 0) + l.double()
            step += 1
            dt = time.perf_counter() - t_step
            compiler.after_step(step, cfg.max_steps, dt)
            rec = {"step": step, **{k: round(v, 5) for k, v in logs.items()}, "lr": lr,
                   "grad_norm": round(grad_norm, 4),
                   "tokens_per_s": round(cfg.batch_size * cfg.seq_len * cfg.grad_accum / dt, 1),
                   "max_violation": [round(max_violation(l), 4) for l in loads], "skipped_steps": skipped}
            if loads:
                rec["max_violation_mean"] = round(float(np.mean(rec["max_violation"])), 4)
            if par is not None and layout.ep > 1 and by_layer:
                rec["ep_rank_imbalance"] = round(ep_rank_imbalance(by_layer, placements, layout.ep), 4)
            due = (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.max_steps
            if pipe is None and val_batches and due:
                rec["val_loss"] = round(evaluate(model, val_batches, device, dtype, cfg.doc_mask), 5)
            if mf is not None:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            bar.update(1)
            bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
                checkpoint(step)
    bar.close()
    checkpoint(step)
    final = out / "final"
    if par is None:
        save_pretrained(model.eval(), final, tokenizer=tok, fp8=cfg.save_fp8)
    else:
        from ..distributed.checkpoint import export_full_state_dict
        full_sd = export_full_state_dict(model, par)
        memories = _gather_objects(memory)
        if rank() == 0:
            full = Transformer(mcfg)
            if cfg.fp8:
                from ..quant.fp8 import convert
                convert(full)
            full.load_state_dict(full_sd)
            full = full.eval()
            save_pretrained(full, final, tokenizer=tok, fp8=cfg.save_fp8)
            if pipe is not None and val_batches:
                val = round(evaluate(full.train(), val_batches, torch.device("cpu"), dtype, cfg.doc_mask), 5)
                records = _read_metrics(metrics_path)
                records[-1]["val_loss"] = val
                metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        from ..distributed.mesh import shutdown
        shutdown()
    if rank() != 0:
        return {}
    records = _read_metrics(metrics_path)
    summary = {"steps": step, "final_loss": records[-1].get("loss") if records else None,
               "first_loss": records[0].get("loss") if records else None,
               "val_loss": next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None),
               "max_violation_mean": records[-1].get("max_violation_mean") if records else None,
               "tokens_per_s": float(np.median([r["tokens_per_s"] for r in records[-20:]])) if records else None,
               "skipped_steps": skipped, "params": n_params, "final_model": str(final),
               "seconds": round(time.perf_counter() - t0, 1)}
    summary["rank_memory"] = memories if par is not None else [memory]     # parameters + AdamW state per rank
    if par is not None:
        summary["layout"] = par.describe()
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plots:
        from .plots import plot_pretrain
        plot_pretrain(metrics_path, out / "plots" / "pretrain.png")
    print0(f"done: loss {summary['first_loss']} -> {summary['final_loss']}, val {summary['val_loss']}; "
           f"model in {final}")
    return summary


# -------------------------------------------------------------------------------------------------
# distributed plumbing (the parallelism itself lives in nanoseek/distributed/)

def _resume(out: Path, model, opt, loader, par) -> tuple[int, dict]:
    """Restore the newest checkpoint (a .pt file from one process, or a DCP directory from any layout)."""
    from ..distributed import checkpoint as dcp_ckpt
    ckpts = out / "checkpoints"
    if par is not None:
        path = dcp_ckpt.latest(ckpts, agree=True)
        if path is None:
            if any(ckpts.glob("step_*.pt")):
                raise UserError(f"--resume: {ckpts} holds checkpoints of a one-process run; resume it without "
                                "torchrun (or start a new --out)")
            print0(f"--resume: no distributed checkpoint in {ckpts}; starting from scratch")
            return 0, {}
        state = dcp_ckpt.load(path, model, opt, par)
    else:
        if dcp_ckpt.latest(ckpts) is not None and not any(ckpts.glob("step_*.pt")):
            raise UserError(f"--resume: {ckpts} holds distributed checkpoints; resume under torchrun (any number "
                            f"of processes, e.g. `torchrun --nproc_per_node 1 -m nanoseek pretrain ... --resume`)")
        resumed = load_latest(ckpts)
        if resumed is None:
            print0(f"--resume: no checkpoint in {ckpts}; starting from scratch")
            return 0, {}
        state, path = resumed
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
    loader.load_state_dict(state["data"])
    set_rng_state(state["rng"])
    print0(f"resumed from {path} at step {state['step']}")
    return state["step"], state.get("expert_load", {})


def moe_layer_loads(model, loads, par=None) -> dict[int, torch.Tensor]:
    """{layer id: this step's global per-expert token counts}, in layer order; under pipelining the
    layers of every stage (gathered from the other pipeline ranks)."""
    moes = {id(m) for m in model.moe_layers()}
    ids = {id(m): moe_layer_id(n, model.cfg.num_hidden_layers) for n, m in model.named_modules() if id(m) in moes}
    mine = {ids[id(m)]: l.cpu() for m, l in zip(model.moe_layers(), loads)}
    if par is not None and par.lay.pp > 1:
        for part in _gather_objects(mine):
            mine.update(part)
    return dict(sorted(mine.items()))


def ep_rank_imbalance(by_layer: dict, placements: dict | None, ep: int) -> float:
    """Mean over MoE layers of max/mean tokens per expert-parallel rank under the current placement."""
    ratios = []
    for i, load in by_layer.items():
        phy2log = (placements or {}).get(i, torch.arange(load.numel()))
        per_rank = load.double()[phy2log].view(ep, -1).sum(1)
        if per_rank.sum() > 0:
            ratios.append(float(per_rank.max() / per_rank.mean()))
    return float(np.mean(ratios)) if ratios else 1.0


def write_expert_load(path: Path, expert_load: dict, steps: int) -> None:
    """OUT/expert_load.json: routed tokens per expert per MoE layer over the run, what `nanoseek eplb` reads."""
    path.write_text(json.dumps({"layers": list(expert_load), "steps": steps,
                                "load": [[round(float(x), 1) for x in l] for l in expert_load.values()]}))


def _gather_objects(obj):
    import torch.distributed as dist
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def _open_metrics(path: Path):
    """The metrics file, appended by rank 0 only."""
    from contextlib import nullcontext
    return path.open("a") if rank() == 0 else nullcontext(None)


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines past the checkpoint's step (they will be recomputed)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    path.write_text("".join(l + "\n" for l in keep))


def main(argv=None) -> None:
    cfg = argparse_dc.parse(PretrainConfig, argv, prog="nanoseek pretrain", description=__doc__.splitlines()[0])
    pretrain(cfg)
