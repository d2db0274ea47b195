"""`nanoseek generate` (one-shot completions) and `nanoseek chat` (an interactive REPL).

    nanoseek generate runs/sft/final --prompt "2+2=" --prompt "3+5=" --temperature 0 --max-tokens 32
    nanoseek generate runs/r1/final --chat --thinking --prompt "What is 7*8?" --json
    nanoseek chat runs/r1/final --thinking

`generate` sends all prompts (x n samples) to the engine as one batch through `LLM.generate`.
`chat` steps the engine itself so tokens are printed as they are sampled, using the same streaming
pieces as the HTTP server (stream.py): `TextStream` releases only complete UTF-8 text, and
`ReasoningSplitter` separates the <think> reasoning from the answer - shown dim grey on a terminal,
behind a `[thinking]` marker when stdout is a pipe. Only the answer goes back into the history, as
DeepSeek recommends (the R1 template would drop old reasoning anyway). Ctrl-C stops the reply being
generated and keeps the REPL; /reset clears the history; /exit or end of input leaves.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..common import UserError, autodetect_device
from ..tokenizer import THINK
from .stream import ReasoningSplitter, TextStream

DIM, RESET = "\033[90m", "\033[0m"    # grey on ANSI terminals


def load_llm(model_dir: str, need_tokenizer: bool = True, device: str | None = None, **kw):
    """An `LLM` for `model_dir`, with errors a user can act on instead of tracebacks."""
    from .llm import LLM

    path = Path(model_dir)
    if not path.is_dir():
        raise UserError(f"model directory {model_dir} not found (expected a directory with config.json and "
                        "*.safetensors, e.g. a run's final/ checkpoint)")
    if not (path / "config.json").is_file():
        raise UserError(f"{model_dir} has no config.json: it is not a model directory")
    llm = LLM(str(path), device=device or str(autodetect_device()), **kw)
    if need_tokenizer and llm.tokenizer is None:
        raise UserError(f"{model_dir} has no usable tokenizer (tokenizer.json, tokenizer_config.json, "
                        "special_tokens_map.json): save the model with save_pretrained(dir, tokenizer=tok)")
    return llm


def _add_flags(ap: argparse.ArgumentParser, temperature: float, top_p: float, max_tokens: int) -> None:
    ap.add_argument("model_dir", help="model directory (config.json, *.safetensors and the tokenizer files)")
    ap.add_argument("--thinking", action="store_true", help="R1 chat template: the reply starts inside <think>")
    ap.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass, in (0, 1]")
    ap.add_argument("--top-k", type=int, default=-1, help="sample among the k likeliest tokens (-1: off)")
    ap.add_argument("--max-tokens", type=int, default=max_tokens, help="most tokens generated per reply")
    ap.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    ap.add_argument("--max-len", type=int, default=None, help="context length (default: min(2048, the model's))")
    ap.add_argument("--dtype", default=None, help="weight dtype: float32, bfloat16, float16 (default: as saved)")
    ap.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    ap.add_argument("--weights", default=None, choices=["fp8"], help="fp8: weight-only FP8 (e4m3 + block scales)")
    ap.add_argument("--no-compile", action="store_true", help="never torch.compile the decode step (default: "
                    "compile a batch size once decoding it has taken as long as compiling it would)")


def _load(args):
    from .sampling import SamplingParams

    params = SamplingParams(n=getattr(args, "n", 1), temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, max_tokens=args.max_tokens, seed=args.seed)
    return load_llm(args.model_dir, max_len=args.max_len, dtype=args.dtype, device=args.device,
                    compile=False if args.no_compile else "auto", weights=args.weights), params


# ------------------------------------------------------------------------------------------------
def main_generate(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek generate", description="Generate completions for one or more "
                                 "prompts (run together as one batch).")
    ap.add_argument("--prompt", action="append", required=True, help="a prompt; repeat the flag for several")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt as a user message in the chat template")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--json", action="store_true", help="print one JSON object per completion")
    _add_flags(ap, temperature=1.0, top_p=1.0, max_tokens=256)
    args = ap.parse_args(argv)
    llm, params = _load(args)
    chat = args.chat or args.thinking
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], thinking=args.thinking)
               if chat else p for p in args.prompt]
    outs = llm.generate(prompts, params)
    for k, out in enumerate(outs):
        for c in out.outputs:
            if args.json:
                record = {"prompt": args.prompt[k], "index": c.index, "text": c.text,
                          "finish_reason": c.finish_reason, "prompt_tokens": len(out.prompt_token_ids),
                          "completion_tokens": len(c.token_ids)}
                if chat:
                    splitter = ReasoningSplitter(in_reasoning=prompts[k].endswith(THINK + "\n"))
                    reasoning, record["content"] = splitter.split(c.text)
                    if splitter.saw_reasoning:
                        record["reasoning_content"] = reasoning
                print(json.dumps(record, ensure_ascii=False), flush=True)
            else:
                if len(outs) > 1 or params.n > 1:
                    print(f"--- prompt {k} sample {c.index} ({c.finish_reason}) ---")
                print(c.text, flush=True)


# ------------------------------------------------------------------------------------------------
class Display:
    """Prints reasoning and answer pieces as they stream: reasoning dim (TTY) or behind [thinking]."""

    def __init__(self, out, color: bool):
        self.out, self.color, self.section = out, color, None

    def write(self, reasoning: str, content: str) -> None:
        if reasoning:
            if self.section != "reasoning":
                self.out.write(DIM if self.color else "[thinking] ")
                self.section = "reasoning"
            self.out.write(reasoning)
        if content:
            if self.section == "reasoning":
                self.out.write(RESET + "\n" if self.color else "\n")
            self.section = "content"
            self.out.write(content)
        self.out.flush()

    def end(self) -> None:
        self.out.write((RESET if self.color and self.section == "reasoning" else "") + "\n")
        self.out.flush()
        self.section = None


def stream_reply(llm, messages: list[dict], params, thinking: bool, display: Display, rid: str) -> str:
    """Generate one assistant turn, printing it as it is sampled; returns the answer (no reasoning)."""
    prompt = llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=thinking)
    _, ids = llm.encode_prompt(prompt)
    if len(ids) >= llm.engine.max_len:
        raise UserError(f"the conversation has {len(ids)} tokens, the context is {llm.engine.max_len}: "
                        "/reset to start over")
    eng = llm.engine
    eng.add_request(ids, params, rid)
    stream = TextStream(llm.decode, params.stop)
    splitter = ReasoningSplitter(in_reasoning=prompt.endswith(THINK + "\n"))
    answer = []
    try:
        while eng.has_work():
            for s in eng.step():
                if s.request_id != rid:
                    continue
                text = stream.finish(llm.to_output(s).text) if s.finish_reason else stream.update(s.out_ids)
                reasoning, content = splitter.feed(text, final=s.finish_reason is not None)
                display.write(reasoning, content)
                answer.append(content)
    except KeyboardInterrupt:
        eng.abort(rid)
        display.write("", " [interrupted]")
    display.end()
    return "".join(answer)


def main_chat(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="nanoseek chat", description="Interactive chat with streamed replies. "
                                 "Commands: /reset (clear the history), /exit (or end of input).")
    ap.add_argument("--system", default=None, help="a system prompt for the whole conversation")
    _add_flags(ap, temperature=0.6, top_p=0.95, max_tokens=1024)   # DeepSeek-R1's recommended sampling
    args = ap.parse_args(argv)
    llm, params = _load(args)
    interactive = sys.stdin.isatty()
    display = Display(sys.stdout, color=sys.stdout.isatty())
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    if interactive:
        if not args.no_compile and llm.engine.runner.compile:     # one reply at a time: batch 1 only
            print("nanoseek chat: compiling the decode step (the first time on this machine ~20 s, then cached; "
                  "--no-compile skips)", file=sys.stderr)
            llm.engine.runner.warmup([1], desc="compiling decode")
        print("nanoseek chat: type a message; /reset clears the history, /exit (or Ctrl-D) leaves", file=sys.stderr)
    for turn in range(sys.maxsize):
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        if not line:                      # readline's end of input
            break
        command = line.strip()
        if command in ("/exit", "/quit"):
            break
        if command == "/reset":
            history = list(start)
            continue
        if not command:
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        try:
            answer = stream_reply(llm, history, params, args.thinking, display, rid=f"chat-{turn}")
        except UserError as e:
            print(f"nanoseek chat: {e}", file=sys.stderr)
            history.pop()
            continue
        history.append({"role": "assistant", "content": answer})
    if interactive:
        print(file=sys.stderr)
