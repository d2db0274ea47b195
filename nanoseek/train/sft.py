"""`nanoseek sft`: supervised fine-tuning on chat JSONL, loss on the assistant part only (R1's cold start).

Each line is {"messages": [{"role": "user", ...}, {"role": "assistant", ...}, ...]}. The tokenizer's
`encode_chat` renders the DeepSeek chat template and returns a loss mask that is 1 exactly on the
assistant contents and the EOS closing each assistant turn. Batches are padded per batch; padded and
prompt positions carry no loss. Optional logit distillation (`kd_alpha` > 0, see distill.py) adds
KL(teacher || student) on the same positions.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import args as argparse_dc
from ..common import (UserError, autocast, autodetect_device, compute_dtype, print0, progress, read_jsonl,
                      seed_everything, set_threads)
from ..quant.fp8 import SCALE_FORMATS
from .optim import build_optimizer, clip_grad_norm, lr_at, set_lr


@dataclass
class SFTConfig:
    data: str = field(default="", metadata={"help": "chat JSONL: one {'messages': [...]} per line"})
    model: str = field(default="", metadata={"help": "model directory to fine-tune"})
    out: str = field(default="runs/sft", metadata={"help": "run directory (final model in OUT/final)"})
    epochs: float = field(default=2.0, metadata={"help": "passes over the data"})
    batch_size: int = field(default=32, metadata={"help": "conversations per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (cosine, 5% warmup)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_len: int = field(default=256, metadata={"help": "truncate conversations to this many tokens"})
    strict: bool = field(default=False, metadata={"help": "fail on a malformed line instead of skipping it"})
    seed: int = field(default=0, metadata={"help": "seed"})
    dtype: str | None = field(default=None, metadata={"help": "matmul dtype (default: fastest here)"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all)"})
    fp8: bool = field(default=False, metadata={"help": "FP8 training (DeepSeek-V3's fine-grained recipe)"})
    fp8_scales: str = field(default="fp32", metadata={"help": "FP8 scale format", "choices": list(SCALE_FORMATS)})
    save_fp8: bool = field(default=False, metadata={"help": "write OUT/final in DeepSeek's FP8 checkpoint format"})
    dp_shard: int = field(default=1, metadata={"help": "FSDP2 over N data-parallel ranks (ZeRO-3); needs torchrun"})
    ep: int = field(default=1, metadata={"help": "expert parallelism over N ranks; needs torchrun"})


def load_chat_jsonl(path: str | Path, strict: bool = False) -> list[list[dict]]:
    """Conversations from a JSONL file; malformed lines are reported as file:line (and skipped)."""
    def parse(row):
        msgs = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(msgs, list) or not msgs:
            raise ValueError("needs a non-empty list 'messages'")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                    not isinstance(m.get("content"), str):
                raise ValueError(f"messages[{i}] needs role in system/user/assistant and string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise ValueError("no assistant message to learn from")
        return msgs
    return read_jsonl(path, parse, strict, what="conversations")


def encode_conversations(tok, convs: list[list[dict]], max_len: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for msgs in convs:
        ids, mask = tok.encode_chat(msgs)
        out.append((ids[:max_len], mask[:max_len]))
    return out


def pad_batch(examples, pad_id: int, device):
    L = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), L)
    for i, (x, m) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float)
    return ids.to(device), mask[:, 1:].to(device)   # mask aligned with targets ids[:, 1:]


def logits_at(model, ids: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Logits at the selected positions: nanoseek runs its head only there; any other causal LM (a
    transformers model) returns all of them."""
    from ..model import Transformer
    if isinstance(model, Transformer):
        return model.logits(model.hidden(ids)[sel])
    return model(ids).logits[sel]


def sft_loss(model, ids, mask, teacher=None, kd_alpha: float = 0.0, kd_temperature: float = 1.0,
             count: int | None = None):
    """Masked next-token CE (+ kd_alpha * KL(teacher || student) at the same positions), summed over the
    supervised tokens and divided by `count` (default: this batch's; the whole step's when the batch is
    one rank's share of it, so that the ranks' losses add up to the step's)."""
    sel = mask.bool()
    count = max(1, int(sel.sum()) if count is None else count)
    logits = logits_at(model, ids[:, :-1], sel).float()
    loss = F.cross_entropy(logits, ids[:, 1:][sel], reduction="sum") / count
    if teacher is not None and kd_alpha > 0:
        with torch.no_grad():
            t_logits = logits_at(teacher, ids[:, :-1], sel).float()
        T = kd_temperature
        kd = F.kl_div(F.log_softmax(logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True,
                      reduction="sum") / count * T * T
        loss = (1 - kd_alpha) * loss + kd_alpha * kd
    return loss


def sft_train(model, tok, examples, cfg: SFTConfig, teacher=None, kd_alpha: float = 0.0, desc="sft",
              par=None) -> dict:
    """The loop, shared by `nanoseek sft` and distillation. Returns summary metrics. `par`
    (nanoseek.distributed.parallelize.Parallel): this rank trains on its rows of each step's batch."""
    device = model.device
    dtype = compute_dtype(device, cfg.dtype, getattr(getattr(model, "cfg", None), "hidden_size", 256),
                          cfg.batch_size * 128)
    model.train()
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay)
    rng = random.Random(cfg.seed)
    steps = max(1, math.ceil(cfg.epochs * len(examples) / cfg.batch_size))
    order: list[int] = []
    losses = []
    t0 = time.perf_counter()
    bar = progress(total=steps, desc=desc)
    for step in range(steps):
        if len(order) < cfg.batch_size:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        batch = [examples[i] for i in order[: cfg.batch_size]]
        del order[: cfg.batch_size]
        set_lr(opt, lr_at(step, steps, cfg.lr, "cosine", max(1, steps // 20), 0.1))
        ids, mask = pad_batch(batch, tok.pad_id, device)
        count = int(mask.sum())                      # supervised tokens in the whole step
        if par is not None:
            ids, mask = par.local_rows(ids), par.local_rows(mask)
        with autocast(device, dtype):
            loss = sft_loss(model, ids, mask, teacher, kd_alpha, count=count)
        (loss * (par.loss_scale if par is not None else 1.0)).backward()
        if par is not None:
            par.sync_grads()
            par.clip_grad_norm(1.0)
            loss_value = par.reduce_logs({"loss": loss.item()})["loss"]
        else:
            clip_grad_norm(model, 1.0)
            loss_value = loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m in getattr(model, "moe_layers", list)():
            m.expert_load.zero_()
        losses.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    model.eval()
    return {"steps": steps, "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
            "losses": [round(x, 6) for x in losses], "examples": len(examples),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> None:
    cfg = argparse_dc.parse(SFTConfig, argv, prog="nanoseek sft", description=__doc__.splitlines()[0])
    if not cfg.data or not cfg.model:
        raise UserError("--data (chat JSONL) and --model (model directory) are required")
    from ..checkpoint.hf import from_pretrained, save_pretrained
    from ..tokenizer import load_tokenizer

    from ..distributed.mesh import layout_from_env
    layout = layout_from_env("sft", cfg.dp_shard, cfg.ep)
    set_threads(cfg.threads or None)
    seed_everything(cfg.seed)
    device = autodetect_device(cfg.device)
    try:
        tok = load_tokenizer(cfg.model)
    except ValueError as e:
        raise UserError(str(e)) from None
    if json.loads((Path(cfg.model) / "config.json").read_text()).get("model_type") in ("deepseek_v3", "deepseek_v2"):
        model = from_pretrained(cfg.model, device=device)
    else:                                              # any causal LM, with its own tokenizer and template
        if layout is not None:
            raise UserError("--dp-shard/--ep apply to nanoseek (DeepSeek-V3-format) models; drop them for this model")
        if cfg.save_fp8:
            raise UserError("--save-fp8 writes DeepSeek's FP8 format, for nanoseek (DeepSeek-V3-format) models only")
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32).to(device)   # fp32 masters
    par = None
    if layout is not None:
        from ..distributed.mesh import check_layout, init
        check_layout(layout, model.cfg, cfg.batch_size, mtp=False)
        d = init(layout, device)
        device = d.device
        model.to(device)                  # (cuda:LOCAL_RANK under torchrun)
    if cfg.fp8:
        from ..quant.fp8 import enable_training
        enable_training(model, cfg.fp8_scales)
    if layout is not None:
        from ..distributed.parallelize import Parallel
        par = Parallel(d, model, compute_dtype(device, cfg.dtype, model.cfg.hidden_size, cfg.batch_size * 128))
        print0(f"distributed: {par.describe()}")
    try:
        examples = encode_conversations(tok, load_chat_jsonl(cfg.data, cfg.strict), cfg.max_len)
    except Exception as e:               # the model's own chat template refused a conversation (jinja or ours)
        if isinstance(e, UserError):
            raise
        raise UserError(f"--data {cfg.data}: the model's chat template cannot render a conversation "
                        f"({type(e).__name__}: {e})") from None
    print0(f"sft: {len(examples):,} conversations, {sum(sum(m) for _, m in examples):,} supervised tokens")
    summary = sft_train(model, tok, examples, cfg, par=par)
    out = Path(cfg.out)
    if par is not None:
        from ..distributed.checkpoint import export_full_state_dict
        from ..distributed.mesh import shutdown
        full_sd = export_full_state_dict(model, par)
        shutdown()
        if par.d.rank != 0:
            return
        from ..model import Transformer
        model = Transformer(model.cfg)
        if cfg.fp8:
            from ..quant.fp8 import convert
            convert(model)
        model.load_state_dict(full_sd)
        model.eval()
    save_pretrained(model, out / "final", tokenizer=tok, fp8=cfg.save_fp8)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print0(f"done: loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}; model in {out / 'final'}")
