"""Pretraining documents: built-in synthetic reasoning corpora, or the user's own files.

Synthetic corpus (no download). Each document is one chat-formatted problem and solution,

    <BOS><｜User｜>347+285=?<｜Assistant｜>COMPLETION<EOS>

where COMPLETION is either *worked* (`<think>7+5=12, 4+8+1=13, 3+2+1=6, so 632</think><answer>632</answer>`,
always right) or *direct* (`<answer>632</answer>`, sometimes a plausible wrong answer). This is the
R1-Zero setting in miniature: the base model has seen careful reasoning, but mostly it has seen
people answer at once, and on hard problems those quick answers are often wrong (for arithmetic:
the carry-less shortcut 347+285 -> 522). Nothing tells it *when* to reason; RL with an accuracy
reward has to discover that. `p_worked` and the per-difficulty `p_wrong` are the dials.

Reflection, the seed of the "aha moment", comes in two forms, each among the worked traces:
- `p_guess` of them open with a quick answer (`Task.guessed_solution`); in a share `p_recheck` of
  those the writer then re-evaluates it (`<think>522? wait, check: 7+5=12, 4+8+1=13, 3+2+1=6, so
  632</think>`: a wrong guess is repaired), the rest stop at the guess (`<think>522</think>`).
- `p_slip` of the others drop a carry somewhere (`Task.slipped_solution`), and a share `p_catch` of
  those writers notice at once and repair it (`4+8=12, wait, check the carry: 4+8+1=13`); the rest
  end wrong.
Kept rare, both leave a base model that reflects rarely, and a reflection pays: it turns a likely
wrong quick answer or a slip into a right one. Which of them RL amplifies is measured in the README
("The aha moment").
"""
from __future__ import annotations

import random
from pathlib import Path

from ..common import UserError, read_jsonl

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"


def prompt_text(question: str) -> str:
    """What the model sees before it answers (the chat template with a generation prompt)."""
    return f"{BOS}{USER}{question}{ASSISTANT}"


def chat_document(question: str, completion: str) -> str:
    return prompt_text(question) + completion + EOS


def default_p_wrong(problem) -> float:
    """Direct answers are reliable on easy problems and usually wrong on hard ones (arithmetic: 3-digit
    operands); a countdown guess made without searching mostly misses."""
    if problem.task == "arithmetic":
        a, b = problem.meta["a"], problem.meta["b"]
        return 0.7 if max(a, b) >= 100 else 0.0
    if problem.task == "countdown":      # without a search, a guess mostly misses
        return 0.8
    return 0.5


def synthetic_documents(n_docs: int, seed: int, task: str = "arithmetic", p_worked: float = 0.2,
                        p_wrong=default_p_wrong, split: str = "train", p_slip: float = 0.0, p_catch: float = 0.0,
                        p_guess: float = 0.0, p_recheck: float = 0.0, **task_knobs) -> list[str]:
    """`n_docs` chat documents from a task's `split` (or "mix": all tasks), deterministic in `seed`."""
    from .tasks import TASKS, get_task

    for name, p in (("p_worked", p_worked), ("p_slip", p_slip), ("p_catch", p_catch), ("p_guess", p_guess),
                    ("p_recheck", p_recheck)):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"{name}={p}: must be in [0, 1]")
    if task == "mix":   # equal parts of every built-in task, interleaved
        parts = [synthetic_documents(n_docs // len(TASKS) + 1, seed + i, name, p_worked, p_wrong, split,
                                     p_slip, p_catch, p_guess, p_recheck)
                 for i, name in enumerate(sorted(TASKS))]
        return [d for group in zip(*parts) for d in group][:n_docs]
    try:
        t = get_task(task, **task_knobs)
    except (ValueError, TypeError) as e:           # an unknown task or knob: one message naming the flags
        knobs = ",".join(f"{k}={v}" for k, v in task_knobs.items())
        raise UserError(f"--task {task}" + (f" --task-args {knobs}" if knobs else "") + f": {e}") from None
    rng = random.Random(seed + 7919)
    docs = []
    for prob in t.problems(n_docs, seed=seed, split=split):
        pw = p_wrong(prob) if callable(p_wrong) else float(p_wrong)
        if rng.random() < p_worked:
            completion = None
            if p_guess and rng.random() < p_guess:
                completion = t.guessed_solution(prob, rng, pw, recheck=rng.random() < p_recheck)
            elif p_slip and rng.random() < p_slip:
                completion = t.slipped_solution(prob, rng, caught=rng.random() < p_catch)
            completion = completion or t.worked_solution(prob)
        else:
            completion = t.direct_solution(prob, rng, pw)
        docs.append(chat_document(prob.question, completion))
    return docs


def load_documents(path: str | Path) -> list[str]:
    """Documents from a .txt / .jsonl / .parquet file, or every such file under a directory."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise UserError(f"--data {path}: no .txt, .jsonl or .parquet files inside")
        return [d for f in files for d in load_documents(f)]
    if not path.exists():
        raise UserError(f"--data {path}: no such file")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [BOS + d.strip() + EOS for d in text.split("\n\n") if d.strip()]
    if path.suffix == ".jsonl":
        return _load_jsonl(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise UserError(f"{path}: parquet file has no 'text' column (columns: {table.column_names})")
        return [BOS + t + EOS for t in table.column("text").to_pylist() if t]
    raise UserError(f"--data {path}: unsupported file type {path.suffix!r} (use .txt, .jsonl or .parquet)")


def _load_jsonl(path: Path) -> list[str]:
    def parse(row):
        if isinstance(row.get("text"), str):
            return BOS + row["text"] + EOS
        if isinstance(row.get("messages"), list):
            return render_messages(row["messages"])
        raise ValueError("needs a string 'text' or a list 'messages'")
    return read_jsonl(path, parse)


def render_messages(messages: list[dict]) -> str:
    """DeepSeek-V3 chat format as plain text (the same rendering the tokenizer's template makes)."""
    sys_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = [BOS, sys_text]
    for m in messages:
        if m["role"] == "user":
            out += [USER, m["content"]]
        elif m["role"] == "assistant":
            out += [ASSISTANT, m["content"], EOS]
        elif m["role"] != "system":
            raise ValueError(f"unknown role {m['role']!r}")
    return "".join(out)
