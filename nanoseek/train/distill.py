"""`nanoseek distill`: teach a small dense student to reason from an RL teacher's traces (R1 sec. 2.4).

    teacher (RL model) --rejection sampling--> verified <think> traces on train prompts
    student (a pretrained small dense base, or a fresh model from a preset) --SFT--> distilled student
    optional: logit distillation (`--kd-alpha`), KL(teacher || student) on the completion tokens

DeepSeek distilled R1 into Qwen/Llama bases with SFT only (no RL) and found it beat RL run directly
on the same small base; `nanoseek r1-zero` measures both on our miniature.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .. import args as argparse_dc
from ..common import UserError, autodetect_device, print0, seed_everything, set_threads
from .rollout import EngineSampler, context_length, evaluate, load_for_sampling
from .sample import SampleConfig, rejection_sample
from .sft import SFTConfig, sft_train


@dataclass
class DistillConfig:
    teacher: str = field(default="", metadata={"help": "teacher model directory (e.g. the RL model)"})
    out: str = field(default="runs/distill", metadata={"help": "run directory (student in OUT/final)"})
    student: str | None = field(default=None, metadata={"help": "pretrained student base directory"})
    student_preset: str = field(default="mini-dense", metadata={"help": "preset for a fresh student (no --student)"})
    task: str = field(default="arithmetic", metadata={"help": "task"})
    task_args: str = field(default="", metadata={"help": "task knobs"})
    n_prompts: int = field(default=2000, metadata={"help": "train prompts to sample traces for"})
    k: int = field(default=2, metadata={"help": "teacher samples per prompt"})
    temperature: float = field(default=0.6, metadata={"help": "teacher sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "teacher nucleus sampling"})
    max_new_tokens: int = field(default=96, metadata={"help": "completion cap"})
    epochs: float = field(default=3.0, metadata={"help": "SFT passes over the traces"})
    batch_size: int = field(default=32, metadata={"help": "SFT batch"})
    lr: float = field(default=2e-3, metadata={"help": "SFT learning rate"})
    kd_alpha: float = field(default=0.0, metadata={"help": "weight of logit distillation (0 = SFT only)"})
    eval_n: int = field(default=200, metadata={"help": "held-out problems"})
    eval_seed: int = field(default=12345, metadata={"help": "held-out seed"})
    seed: int = field(default=0, metadata={"help": "seed"})
    device: str | None = field(default=None, metadata={"help": "cpu | cuda"})
    threads: int = field(default=0, metadata={"help": "CPU threads (0 = all)"})


def n_params(model) -> int:
    """nanoseek's count (main model, without the MTP module) or, for other models, every parameter."""
    if hasattr(model, "num_params"):
        return model.num_params()
    return sum(p.numel() for p in model.parameters())


def distill(cfg: DistillConfig, teacher=None, tok=None, student=None) -> dict:
    from ..checkpoint.hf import save_pretrained
    from ..config import load_preset
    from ..model import Transformer
    from ..data.tasks import make_task
    from .sft import encode_conversations

    set_threads(cfg.threads or None)
    seed_everything(cfg.seed)
    device = autodetect_device(cfg.device)
    task = make_task(task=cfg.task, task_args=cfg.task_args)
    problems = task.problems(cfg.n_prompts, seed=cfg.seed + 1, split="train")
    held_out = task.problems(cfg.eval_n, seed=cfg.eval_seed, split="test")
    questions = [p.question for p in problems + held_out]
    if teacher is None:
        if not cfg.teacher:
            raise UserError("--teacher is required")
        # any causal LM with its own tokenizer: the student learns in the teacher's vocabulary
        t_sampler, teacher, tok = load_for_sampling(cfg.teacher, device, questions, cfg.max_new_tokens, seed=cfg.seed)
    else:
        t_sampler = EngineSampler(teacher, tok, max_batch=256, seed=cfg.seed,
                                  max_len=context_length(tok, questions, cfg.max_new_tokens,
                                                         teacher.cfg.max_position_embeddings))
    t_cfg = getattr(teacher, "cfg", None) or teacher.config
    s_tok, s_sampler = tok, None           # the student's tokenizer: the teacher's unless it brings its own
    if student is None:
        if cfg.student:                    # any causal LM: SFT on the traces' text in its own tokenizer
            s_sampler, student, s_tok = load_for_sampling(cfg.student, device, questions, cfg.max_new_tokens,
                                                          seed=cfg.seed)
        else:
            bos = tok.bos_id if tok.bos_id is not None else tok.eos_id
            scfg = load_preset(cfg.student_preset, vocab_size=t_cfg.vocab_size, bos_token_id=bos,
                               eos_token_id=tok.eos_id)
            student = Transformer(scfg).init_weights(cfg.seed).to(device)
    s_cfg = getattr(student, "cfg", None) or student.config
    if cfg.kd_alpha > 0 and s_cfg.vocab_size != t_cfg.vocab_size:
        raise UserError(f"--kd-alpha: student vocab {s_cfg.vocab_size} != teacher vocab {t_cfg.vocab_size}; logit "
                        "distillation needs one tokenizer (SFT on the traces alone works across tokenizers)")
    scfg_ = SampleConfig(k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                         seed=cfg.seed)
    rows, sample_stats = rejection_sample(t_sampler, tok, problems, scfg_)
    if not rows:
        raise UserError("the teacher produced no verified traces to distil; train it longer or raise --k")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "traces.jsonl").open("w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print0(f"distill: {len(rows):,} verified teacher traces ({sample_stats['correct_rate']:.1%} of samples correct)")
    examples = encode_conversations(s_tok, [r["messages"] for r in rows], 512)
    sft_summary = sft_train(student, s_tok, examples, SFTConfig(epochs=cfg.epochs, batch_size=cfg.batch_size,
                                                                 lr=cfg.lr, seed=cfg.seed),
                            teacher=teacher if cfg.kd_alpha > 0 else None, kd_alpha=cfg.kd_alpha, desc="distill")
    if s_sampler is None:
        s_sampler = EngineSampler(student, s_tok, max_len=context_length(
            s_tok, [p.question for p in held_out], cfg.max_new_tokens, student.cfg.max_position_embeddings))
    else:
        s_sampler.sync_weights()           # the SFT stepped the model the sampler decodes with
    s_eval = evaluate(s_sampler, s_tok, held_out, cfg.max_new_tokens)
    t_eval = evaluate(t_sampler, tok, held_out, cfg.max_new_tokens)
    save_pretrained(student, out / "final", tokenizer=s_tok)
    summary = {"teacher_accuracy": t_eval["accuracy"], "student_accuracy": s_eval["accuracy"],
               "ratio": s_eval["accuracy"] / max(1e-9, t_eval["accuracy"]), "teacher_params": n_params(teacher),
               "student_params": n_params(student), "traces": len(rows), "sampling": sample_stats,
               "sft": sft_summary, "student_eval": s_eval, "final_model": str(out / "final")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print0(f"student {s_eval['accuracy']:.3f} vs teacher {t_eval['accuracy']:.3f} "
           f"({summary['ratio']:.0%} of the teacher with {summary['student_params']:,} vs "
           f"{summary['teacher_params']:,} params)")
    return summary


def main(argv=None) -> None:
    cfg = argparse_dc.parse(DistillConfig, argv, prog="nanoseek distill", description=__doc__.splitlines()[0])
    distill(cfg)
