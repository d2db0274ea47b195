"""`nanoseek generate` and `nanoseek chat` as a user runs them (subprocesses), on a tiny random model."""
import io
import json
import subprocess
import sys

import pytest

from nanoseek import save_pretrained
from nanoseek.common import UserError
from nanoseek.config import load_preset
from nanoseek.inference import LLM, SamplingParams
from nanoseek.inference.cli import Display, main_chat, main_generate, stream_reply
from nanoseek.model import Transformer


def nanoseek(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "nanoseek", *map(str, args)], input=stdin, capture_output=True,
                          text=True, timeout=120)


def test_generate_prints_completions(model_dir):
    r = nanoseek("generate", model_dir, "--prompt", "Hello", "--prompt", "The quick", "--temperature", "0",
                 "--max-tokens", "6", "--json", "--device", "cpu")     # cpu: compared with the LLM below
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["prompt"] for rec in records] == ["Hello", "The quick"]
    llm = LLM(str(model_dir))
    want = llm.generate(["Hello", "The quick"], SamplingParams(temperature=0, max_tokens=6))
    assert [rec["text"] for rec in records] == [o.outputs[0].text for o in want]
    assert all(rec["completion_tokens"] <= 6 and rec["finish_reason"] in ("stop", "length") for rec in records)


def test_generate_chat_in_process(model_dir, capsys):
    main_generate([str(model_dir), "--prompt", "Hi", "--chat", "--thinking", "--max-tokens", "4", "--seed", "1",
                   "--n", "2", "--json"])
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["index"] for r in records] == [0, 1]
    assert all(r["text"].lstrip().startswith(r["reasoning_content"]) for r in records)  # R1: replies open in <think>


def test_generate_with_fp8_weights(model_dir, capsys):
    main_generate([str(model_dir), "--prompt", "Hello", "--temperature", "0", "--max-tokens", "4", "--json",
                   "--weights", "fp8", "--device", "cpu"])
    rec = json.loads(capsys.readouterr().out.splitlines()[0])
    assert rec["prompt"] == "Hello" and rec["completion_tokens"] <= 4


def test_generate_errors_exit_2(model_dir, tmp_path):
    r = nanoseek("generate", tmp_path / "missing", "--prompt", "Hello")
    assert r.returncode == 2
    assert "not found" in r.stderr and "Traceback" not in r.stderr
    save_pretrained(Transformer(load_preset("tiny", vocab_size=300)).init_weights(0), tmp_path / "no-tok")
    with pytest.raises(UserError, match="no usable tokenizer"):
        main_generate([str(tmp_path / "no-tok"), "--prompt", "Hello"])
    with pytest.raises(UserError, match="temperature"):
        main_generate([str(model_dir), "--prompt", "Hello", "--temperature", "-1"])


def test_chat_two_turns_then_eof(model_dir):
    r = nanoseek("chat", model_dir, "--thinking", "--max-tokens", "5", "--seed", "0", stdin="Hello\n\nHow are you?\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("[thinking] ") and r.stdout.count("\n") >= 2 and "Traceback" not in r.stderr


def test_chat_exit_reset_and_history(model_dir, monkeypatch):
    import nanoseek.inference.cli as cli
    seen = []

    def fake_reply(llm, messages, *args, **kw):
        seen.append([m["content"] for m in messages])
        return f"answer {len(seen)}"

    monkeypatch.setattr(cli, "stream_reply", fake_reply)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nAgain\n/reset\nFresh\n/exit\nnever read\n"))
    main_chat([str(model_dir), "--system", "Be brief."])
    assert seen == [["Be brief.", "Hello"], ["Be brief.", "Hello", "answer 1", "Again"], ["Be brief.", "Fresh"]]


def test_stream_reply_shows_reasoning_and_keeps_history(model_dir):
    llm = LLM(str(model_dir), max_len=64)
    out = io.StringIO()
    history = [{"role": "user", "content": "Hello"}]
    answer = stream_reply(llm, history, SamplingParams(temperature=0, max_tokens=8), True, Display(out, False), "r0")
    assert out.getvalue().startswith("[thinking] ") and not llm.engine.has_work()
    assert answer in out.getvalue()
    colored = io.StringIO()
    stream_reply(llm, history, SamplingParams(temperature=0, max_tokens=8), True, Display(colored, True), "r1")
    assert colored.getvalue().startswith("\033[90m") and "\033[0m" in colored.getvalue()
    with pytest.raises(UserError, match="/reset"):
        stream_reply(llm, [{"role": "user", "content": "hello " * 100}], SamplingParams(), False, Display(out, False),
                     "r2")
