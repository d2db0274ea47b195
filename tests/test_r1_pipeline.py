"""The R1 pipeline end to end on the tiny preset: GRPO (nanoseek and HF policies), SFT, rejection
sampling, distillation, eval, r1-zero - and the mistakes users make with their files and flags."""
import json
from pathlib import Path

import pytest
import torch

import nanoseek

from conftest import nanoseek_cli
from nanoseek.common import UserError


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from nanoseek.train.pretrain import PretrainConfig, pretrain
    out = tmp_path_factory.mktemp("base")
    pretrain(PretrainConfig(preset="tiny", out=str(out), max_steps=40, n_docs=3000, batch_size=16, seq_len=64,
                            lr=5e-3, warmup=5, eval_every=0, plots=False, dtype="float32"))
    return out / "final"


@pytest.fixture(scope="module")
def teacher(base, tmp_path_factory):
    """The base, fine-tuned on worked 1-digit sums so it produces verifiable traces."""
    from nanoseek.checkpoint.hf import from_pretrained
    from nanoseek.data.tasks import get_task
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.sft import SFTConfig, encode_conversations, sft_train
    tok, model = Tokenizer.load(base), from_pretrained(base)
    task = get_task("arithmetic", min_digits=1, max_digits=1)
    convs = [[{"role": "user", "content": p.question}, {"role": "assistant", "content": task.worked_solution(p)}]
             for p in task.problems(80, seed=0, split="train")]
    sft_train(model, tok, encode_conversations(tok, convs, 64), SFTConfig(epochs=12, batch_size=16, lr=3e-3))
    out = tmp_path_factory.mktemp("teacher")
    nanoseek.save_pretrained(model, out, tokenizer=tok)
    return out


def small_grpo(model, out, **kw):
    from nanoseek.train.grpo import GRPOConfig
    base = dict(model=str(model), out=str(out), steps=2, prompts_per_step=3, group_size=4, max_new_tokens=16,
                eval_n=8, eval_every=0, dtype="float32", max_refill=1)
    base.update(kw)
    return GRPOConfig(**base)


def test_grpo_runs_and_logs_everything(base, tmp_path):
    from nanoseek.train.grpo import grpo
    s = grpo(small_grpo(base, tmp_path, reward="accuracy:1,format:0.5", mu=2, beta=0.05, loss_type="grpo",
                        dynamic_sampling=False))
    assert {"accuracy_before", "accuracy_after", "final_model"} <= set(s)
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if "reward" in r]
    for key in ("reward", "reward_accuracy", "reward_format", "completion_len", "think_rate", "reflection_rate",
                "frac_zero_std", "clip_frac", "kl", "entropy", "tokens_per_s"):
        assert key in train[-1], key
    assert (tmp_path / "plots" / "grpo.png").exists() and (tmp_path / "final" / "config.json").exists()


def test_grpo_tells_the_engine_how_much_work_is_left(base, tmp_path, monkeypatch):
    """The decode compile policy's horizon: training rollouts count GRPO steps, evaluations count
    evaluations (before the first step, every eval_every steps, after the last)."""
    from nanoseek.train.grpo import grpo
    from nanoseek.train.rollout import EngineSampler
    calls = []
    real = EngineSampler.horizon
    monkeypatch.setattr(EngineSampler, "horizon",
                        lambda self, d, t, phase="rollout": calls.append((d, t, phase)) or real(self, d, t, phase))
    grpo(small_grpo(base, tmp_path, steps=3, eval_every=2, dynamic_sampling=False))
    assert calls == [(0, 3, "eval"), (0, 3, "rollout"), (1, 3, "rollout"), (1, 3, "eval"), (2, 3, "rollout"),
                     (2, 3, "eval")]


def test_grpo_trains_an_hf_causal_lm(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.grpo import grpo
    tok = Tokenizer.load(base)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                   bos_token_id=tok.bos_id, eos_token_id=tok.eos_id, max_position_embeddings=128)
    hf_dir = tmp_path / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(hf_dir)
    tok.save(hf_dir)
    s = grpo(small_grpo(hf_dir, tmp_path / "run", dynamic_sampling=False))
    assert "accuracy_after" in s


def test_grpo_and_sft_with_fp8(base, tmp_path):
    from nanoseek.train.grpo import grpo
    from nanoseek.train.sft import main
    s = grpo(small_grpo(base, tmp_path / "grpo", fp8=True, fp8_scales="ue8m0", dynamic_sampling=False, save_fp8=True))
    assert "accuracy_after" in s
    assert "quantization_config" in json.loads((tmp_path / "grpo" / "final" / "config.json").read_text())
    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "2+2=?"},
                                             {"role": "assistant", "content": "<answer>4</answer>"}]}) + "\n")
    main(["--data", str(data), "--model", str(base), "--out", str(tmp_path / "sft"), "--epochs", "2",
          "--batch-size", "1", "--fp8"])
    assert (tmp_path / "sft" / "final" / "config.json").exists()


def test_grpo_bad_flags(base, tmp_path):
    from nanoseek.train.grpo import grpo
    with pytest.raises(UserError, match="group-size"):
        grpo(small_grpo(base, tmp_path, group_size=1))
    with pytest.raises(UserError, match="reward"):
        grpo(small_grpo(base, tmp_path, reward="accuracy:1,bogus:2"))
    with pytest.raises(UserError, match="not a model directory"):
        grpo(small_grpo(tmp_path / "nope", tmp_path))
    with pytest.raises(UserError, match="task-args"):
        grpo(small_grpo(base, tmp_path, task_args="min_digits"))


def test_sft_reports_bad_lines_and_trains(base, tmp_path, capsys):
    from nanoseek.train.sft import load_chat_jsonl, main
    data = tmp_path / "sft.jsonl"
    good = {"messages": [{"role": "user", "content": "2+2=?"},
                         {"role": "assistant", "content": "<think>2+2=4, so 4</think><answer>4</answer>"}]}
    lines = [json.dumps(good)] * 20
    lines[3] = "{not json"
    lines[7] = json.dumps({"messages": [{"role": "bot", "content": "x"}]})
    data.write_text("\n".join(lines) + "\n")
    assert len(load_chat_jsonl(data)) == 18
    err = capsys.readouterr().err
    assert f"{data}:4:" in err and f"{data}:8:" in err
    with pytest.raises(UserError, match=f"{data}:4:"):
        load_chat_jsonl(data, strict=True)
    main(["--data", str(data), "--model", str(base), "--out", str(tmp_path / "sft"), "--epochs", "1",
          "--batch-size", "8"])
    assert (tmp_path / "sft" / "final" / "tokenizer.json").exists()


def test_sample_and_eval_cli(base, teacher, tmp_path):
    out = tmp_path / "s.jsonl"
    r = nanoseek_cli("sample", "--model", teacher, "--out", out, "--n-prompts", "20", "--k", "2",
                     "--max-new-tokens", "24", "--task-args", "min_digits=1,max_digits=1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and "kept" in r.stdout
    from nanoseek.data.tasks import extract_answer, get_task, is_well_formatted
    from nanoseek.data.tasks.common import Problem
    task = get_task("arithmetic")
    for row in rows:      # every kept sample is verified and well formatted
        q, a = row["messages"][0]["content"], row["messages"][1]["content"]
        x, y = q.removesuffix("=?").split("+")
        assert is_well_formatted(a) and task.check(extract_answer(a), Problem("arithmetic", q, str(int(x) + int(y))))
    r = nanoseek_cli("eval", "--model", base, "--n", "10", "--json", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert 0.0 <= res["accuracy"] <= 1.0 and res["n"] == 10
    r = nanoseek_cli("eval", "--model", base, "--samples", "4")
    assert r.returncode == 2 and "temperature" in r.stderr and "Traceback" not in r.stderr


def test_distill_small_student(teacher, tmp_path):
    from nanoseek.train.distill import DistillConfig, distill
    s = distill(DistillConfig(teacher=str(teacher), out=str(tmp_path), student_preset="mini-dense", n_prompts=40,
                              k=2, max_new_tokens=24, epochs=1, eval_n=10, kd_alpha=0.5,
                              task_args="min_digits=1,max_digits=1"))
    assert s["traces"] > 0 and {"teacher_accuracy", "student_accuracy", "ratio"} <= set(s)
    rows = [json.loads(l) for l in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert len(rows) == s["traces"] and all("<think>" in r["messages"][1]["content"] for r in rows)
    assert (tmp_path / "final" / "config.json").exists()


def test_distill_without_traces_says_why(base, tmp_path):
    from nanoseek.train.distill import DistillConfig, distill
    with pytest.raises(UserError, match="no verified traces"):
        distill(DistillConfig(teacher=str(base), out=str(tmp_path), n_prompts=4, k=1, max_new_tokens=2, eval_n=4))


def test_r1_zero_smoke(tmp_path, monkeypatch):
    import nanoseek.train.pretrain as pretrain_mod
    from nanoseek.train.r1_zero import R1ZeroConfig, r1_zero
    policies, real = [], pretrain_mod.pretrain
    monkeypatch.setattr(pretrain_mod, "pretrain", lambda c: policies.append(c.compile) or real(c))
    rep = r1_zero(R1ZeroConfig(out=str(tmp_path), preset="tiny", pretrain_steps=15, n_docs=2000, batch_size=8,
                               seq_len=64, rl_steps=2, prompts_per_step=3, group_size=4, max_new_tokens=24,
                               eval_n=10, reflect_n=6, student_pretrain_steps=5, distill_prompts=20,
                               student_rl_steps=1))
    saved = json.loads((tmp_path / "report.json").read_text())
    for key in ("task", "base_model", "final_model", "accuracy_before", "accuracy_after", "seconds", "distill",
                "reflection_rate_before", "reflection_rate_after", "reflection", "aha_example"):
        assert key in saved, key
    assert saved == json.loads(json.dumps(rep))
    assert saved["reflection"]["n"] == 6 and saved["reflection"]["samples"] == 4
    md = (tmp_path / "report.md").read_text()
    assert "pass@1" in md and "## Reflection" in md and (tmp_path / "plots" / "grpo.png").exists()
    assert json.loads((tmp_path / "config.json").read_text())["max_new_tokens"] == 24      # resolved config saved
    assert policies == ["off", "off"]     # teacher and student pretrain eagerly: the same figures every run


def test_r1_zero_task_defaults_fill_only_unset_flags():
    from nanoseek.common import UserError
    from nanoseek.train.r1_zero import TASK_DEFAULTS, R1ZeroConfig, resolve
    c = resolve(R1ZeroConfig(task="countdown", rl_steps=7))
    assert c.rl_steps == 7 and c.max_new_tokens == TASK_DEFAULTS["countdown"]["max_new_tokens"]
    assert c.rl_task_args.startswith("n_numbers=") and c.distill is False
    a = resolve(R1ZeroConfig())
    assert a.rl_task_args == "min_digits=3,max_digits=3" and a.distill is True and a.pretrain_steps == 800
    assert resolve(R1ZeroConfig(task="equations")).rl_task_args == ""
    with pytest.raises(UserError, match="--task sums: unknown"):
        resolve(R1ZeroConfig(task="sums"))
    with pytest.raises(UserError, match="--p-catch 1.5: a share"):
        resolve(R1ZeroConfig(p_catch=1.5))
    with pytest.raises(UserError, match="--distill-prompts 0: must be at least 1"):      # before pretraining
        resolve(R1ZeroConfig(distill_prompts=0))
    with pytest.raises(UserError, match="--rl-steps -3"):
        resolve(R1ZeroConfig(rl_steps=-3))
    with pytest.raises(UserError, match="--group-size 1: GRPO"):
        resolve(R1ZeroConfig(group_size=1))
    r = nanoseek_cli("r1-zero", "--out", "unused", "--distill-prompts", "0")
    assert r.returncode == 2 and "--distill-prompts 0" in r.stderr and "Traceback" not in r.stderr


def test_reflection_stats():
    from nanoseek.train.rollout import BACKTRACK, REFLECTION, reflection_stats
    r = reflection_stats([True, True, False, False, False], [True, False, True, False, False])
    assert r == {"reflection_rate": 0.4, "self_correction_rate": 0.2, "accuracy_reflecting": 0.5,
                 "accuracy_not_reflecting": 1 / 3}
    assert reflection_stats([False], [True])["accuracy_reflecting"] is None
    assert REFLECTION.search("4+8=12, wait, check the carry") and not REFLECTION.search("waiting")
    assert BACKTRACK.search("7+4=11, 11+3=14 no. 7*4=28") and not BACKTRACK.search("<answer>no</answer>")


def test_long_prompts_size_the_context_and_too_long_ones_are_refused(base, tmp_path):
    """A 700-token prompt trains (the context was max_new_tokens + 256); one past the model's limit stops
    before any work with the numbers and the fix."""
    from nanoseek.common import UserError
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.grpo import grpo
    from nanoseek.train.rollout import context_length, prompt_ids
    tok = Tokenizer.load(base)
    long_q = "Add the numbers. " + "12 plus 34, " * 55 + "what is 1+1?"
    assert 600 < len(prompt_ids(tok, long_q)) < 1000
    f = tmp_path / "tasks.jsonl"
    rows = [{"prompt": long_q.replace("1+1", f"{i}+1"), "answer": str(i + 1)} for i in range(12)]
    rows += [{"prompt": f"{i}+2=?", "answer": str(i + 2)} for i in range(12)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    s = grpo(small_grpo(base, tmp_path / "run", tasks_file=str(f), steps=1, eval_n=2, plots=False, save_final=False))
    assert "accuracy_after" in s
    with pytest.raises(UserError, match="max_position_embeddings=1024"):
        context_length(tok, [long_q], 600, 1024)
    with pytest.raises(UserError, match="--max-new-tokens"):
        grpo(small_grpo(base, tmp_path / "run2", tasks_file=str(f), steps=1, max_new_tokens=600))


def test_dr_grpo_drops_the_std_scaling():
    from nanoseek.train.grpo import GRPOConfig, scale_rewards
    assert scale_rewards(GRPOConfig(loss_type="dr_grpo")) == "none"
    assert scale_rewards(GRPOConfig(loss_type="dapo")) == "group"
    assert scale_rewards(GRPOConfig(loss_type="dr_grpo", scale_rewards="batch")) == "batch"   # explicit wins


def test_grpo_resume_equals_an_uninterrupted_run(base, tmp_path):
    """Stop after step 2 (its checkpoint kept, later ones gone) and resume: steps 3-4 log exactly what the
    uninterrupted run logged (rollouts, rewards, losses), and the final model is the same."""
    import shutil

    from nanoseek.train.grpo import grpo
    cfg = dict(steps=4, save_every=2, keep=5, compile="off", eval_every=0, plots=False, mu=2, minibatches=2)
    grpo(small_grpo(base, tmp_path, **cfg))
    timing = ("gen_s", "train_s", "tokens_per_s")

    def records():
        return [{k: v for k, v in json.loads(l).items() if k not in timing}
                for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    full = records()
    final = (tmp_path / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "final")
    for ck in (tmp_path / "checkpoints").glob("step_000004*"):
        ck.unlink()
    s = grpo(small_grpo(base, tmp_path, resume=True, **cfg))
    assert records() == full
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == final
    assert s["accuracy_before"] == full[0]["eval_accuracy"]


def test_steps_without_a_reward_signal_are_warned_counted_and_do_not_step(base, tmp_path, capsys):
    """Every group all-equal (no answer can match): the run says so once, counts the short steps, and a
    step with no group trains at lr x 0 (the weights stay those of the base)."""
    from safetensors.torch import load_file

    from nanoseek.train.grpo import grpo
    f = tmp_path / "tasks.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}+1=?", "answer": "no such answer"}) + "\n" for i in range(40)))
    s = grpo(small_grpo(base, tmp_path / "run", tasks_file=str(f), steps=2, eval_n=2, plots=False, max_refill=1))
    assert s["short_steps"] == 2
    err = capsys.readouterr().out
    assert err.count("had a reward signal") == 1 and "--max-refill" in err
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["groups_trained"] for r in recs if "groups_trained" in r] == [0, 0]
    a, b = load_file(base / "model.safetensors"), load_file(tmp_path / "run" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    """A tiny Qwen2 with its own byte-level BPE, specials, EOS (<|im_end|>) and chat template - nothing of
    nanoseek's tokenizer in the directory."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [f"{a}+{b}=? <think>{a}+{b}={a + b}</think><answer>{a + b}</answer> user assistant"
             for a in range(30) for b in range(30)]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                               pad_token="<|endoftext|>", chat_template=QWEN_TEMPLATE)
    d = tmp_path_factory.mktemp("qwen")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    assert not (d / "special_tokens_map.json").exists() or "begin" not in (d / "special_tokens_map.json").read_text()
    return d


def test_any_hf_model_with_its_own_tokenizer_end_to_end(qwen_dir, tmp_path):
    """grpo -> eval -> sample -> sft on a Qwen2 with its own tokenizer and chat template, through the CLI:
    every verb exits 0 with no traceback (the run used to stop on the missing DeepSeek tokenizer)."""
    def run(*args):
        r = nanoseek_cli(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, (args[0], r.stderr[-3000:])
        return r
    task = ["--task", "arithmetic", "--task-args", "min_digits=1,max_digits=1"]
    run("grpo", "--model", str(qwen_dir), "--out", str(tmp_path / "rl"), *task, "--steps", "2",
        "--prompts-per-step", "2", "--group-size", "4", "--max-new-tokens", "12", "--eval-n", "4",
        "--eval-every", "0", "--no-plots", "--dtype", "float32")
    rl = tmp_path / "rl" / "final"
    assert (rl / "tokenizer_config.json").exists() and "im_end" in (rl / "tokenizer_config.json").read_text()
    r = run("eval", "--model", str(rl), *task, "--n", "4", "--max-new-tokens", "12", "--json")
    assert json.loads(r.stdout)["n"] == 4
    run("sample", "--model", str(rl), *task, "--n-prompts", "4", "--k", "2", "--max-new-tokens", "12",
        "--out", str(tmp_path / "traces.jsonl"))
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{a}+1=?"},
                                                     {"role": "assistant", "content": f"<answer>{a + 1}</answer>"}]})
                            + "\n" for a in range(16)))
    run("sft", "--model", str(rl), "--data", str(chat), "--out", str(tmp_path / "sft"), "--epochs", "1",
        "--batch-size", "8", "--dtype", "float32")
    assert (tmp_path / "sft" / "final" / "config.json").exists()


def test_distill_with_hf_teacher_and_hf_student(qwen_dir, tmp_path):
    """A Qwen2 teacher (SFT'd on worked sums until some answers are right) distilled into a Qwen2 student with
    its own tokenizer: verified traces, the student's loss falls, an HF directory transformers loads (the
    student used to be loaded as a DeepSeek model: a traceback)."""
    import transformers

    from nanoseek.data.tasks import Arithmetic
    from nanoseek.train.distill import DistillConfig, distill
    from nanoseek.train.sft import main as sft_main
    task = Arithmetic(min_digits=1, max_digits=1)
    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p.question},
                                                     {"role": "assistant", "content": task.worked_solution(p)}]})
                            + "\n" for p in task.problems(400, seed=1)))
    sft_main(["--data", str(chat), "--model", str(qwen_dir), "--out", str(tmp_path / "teacher"), "--epochs", "8",
              "--batch-size", "16", "--lr", "3e-3", "--dtype", "float32"])
    s = distill(DistillConfig(teacher=str(tmp_path / "teacher" / "final"), student=str(qwen_dir),
                              out=str(tmp_path / "dis"), task="arithmetic", task_args="min_digits=1,max_digits=1",
                              n_prompts=32, k=2, max_new_tokens=24, epochs=6, batch_size=4, eval_n=16))
    assert s["traces"] > 0 and s["teacher_accuracy"] > 0 and s["sft"]["steps"] > 1
    assert s["sft"]["final_loss"] < s["sft"]["first_loss"]
    final = Path(s["final_model"])
    transformers.AutoModelForCausalLM.from_pretrained(final)
    assert "im_end" in transformers.AutoTokenizer.from_pretrained(final).eos_token


def test_routing_replay_needs_a_nanoseek_model(qwen_dir, tmp_path):
    from nanoseek.train.grpo import GRPOConfig, grpo
    with pytest.raises(UserError, match="--routing-replay needs a nanoseek"):
        grpo(GRPOConfig(model=str(qwen_dir), out=str(tmp_path), routing_replay=True, steps=1, eval_n=2))
    with pytest.raises(UserError, match="--reward-timeout -1"):
        grpo(GRPOConfig(model=str(qwen_dir), out=str(tmp_path), reward_timeout=-1, steps=1, eval_n=2))


def test_hf_chat_mask_marks_exactly_the_assistant_replies(qwen_dir):
    from nanoseek.tokenizer import HFChatTokenizer, load_tokenizer
    tok = load_tokenizer(qwen_dir)
    assert isinstance(tok, HFChatTokenizer) and tok.decode([tok.eos_id], skip_special_tokens=False) == "<|im_end|>"
    msgs = [{"role": "user", "content": "1+2=?"}, {"role": "assistant", "content": "<answer>3</answer>"},
            {"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "<answer>4</answer>"}]
    ids, mask = tok.encode_chat(msgs)
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "<answer>3</answer><|im_end|>\n<answer>4</answer><|im_end|>\n"
    assert tok.decode(ids, skip_special_tokens=False) == tok.apply_chat_template(msgs, add_generation_prompt=False)


def test_grpo_takes_reward_functions_from_the_api(base, tmp_path):
    from nanoseek.train.grpo import train

    def short(prompts, completions, problems, **kw):
        return [-len(c) / 100 for c in completions]
    s = train(small_grpo(base, tmp_path, steps=1, plots=False, save_final=False), rewards=[(short, 2.0)])
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert "reward_short" in rec and rec["reward"] <= 0 and "accuracy_after" in s


def test_rollout_mismatch_is_logged_and_corrected(base, tmp_path):
    """fp32 rollouts: the engine's log-probs equal the trainer's (gap ~0); bf16 rollouts against fp32
    training: a measurable gap, and --rollout-is truncate weights it (the share of capped tokens logged)."""
    from nanoseek.train.grpo import grpo

    def last(out):
        return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if "rollout_logp_gap" in l][-1]
    grpo(small_grpo(base, tmp_path / "fp32", steps=1, plots=False, save_final=False, rollout_dtype="float32",
                    compile="off", dynamic_sampling=False))
    assert last(tmp_path / "fp32")["rollout_logp_gap"] < 1e-4
    grpo(small_grpo(base, tmp_path / "bf16", steps=1, plots=False, save_final=False, rollout_dtype="bfloat16",
                    compile="off", dynamic_sampling=False, rollout_is="truncate", rollout_is_cap=1.002))
    rec = last(tmp_path / "bf16")
    assert rec["rollout_logp_gap"] > 1e-3 and 0 < rec["rollout_is_capped"] < 1
    grpo(small_grpo(base, tmp_path / "r3", steps=2, plots=False, save_final=False, rollout_dtype="float32",
                    compile="off", dynamic_sampling=False, routing_replay=True, minibatches=2))
    assert last(tmp_path / "r3")["rollout_logp_gap"] < 1e-4      # fp32 rollouts through the recording path


def test_hf_tokenizer_stops_on_the_templates_end_of_turn_and_masks_past_a_think_prompt(qwen_dir, tmp_path):
    """A base model whose EOS (<|endoftext|>) is not what closes a chat turn (<|im_end|>) stops on both;
    a template whose generation prompt adds "<think>\\n" (R1-distill style) still trains the whole reply."""
    import transformers

    from nanoseek.tokenizer import HFChatTokenizer
    hf = transformers.AutoTokenizer.from_pretrained(qwen_dir)
    hf.eos_token = "<|endoftext|>"
    tok = HFChatTokenizer(hf)
    assert tok.stop_ids == [hf.convert_tokens_to_ids("<|endoftext|>"), hf.convert_tokens_to_ids("<|im_end|>")]
    hf.chat_template = QWEN_TEMPLATE.replace("<|im_start|>assistant\n{% endif %}",
                                             "<|im_start|>assistant\n<think>\n{% endif %}")
    msgs = [{"role": "user", "content": "1+2=?"}, {"role": "assistant", "content": "<answer>3</answer>"}]
    ids, mask = HFChatTokenizer(hf).encode_chat(msgs)
    trained = hf.decode([i for i, m in zip(ids, mask) if m])
    assert trained.startswith("<answer>3</answer>"), trained


def test_grpo_resume_refuses_a_changed_sampling_setup(base, tmp_path):
    from nanoseek.common import UserError
    from nanoseek.train.grpo import grpo
    grpo(small_grpo(base, tmp_path, steps=1, plots=False, save_final=False, eval_n=2))
    with pytest.raises(UserError, match="--group-size was 4"):
        grpo(small_grpo(base, tmp_path, steps=2, plots=False, save_final=False, eval_n=2, group_size=8, resume=True))


def test_dynamic_sampling_refills_and_carries_surplus_groups(base, tmp_path):
    """Step 1: 3 of 4 groups have a signal, the refill round brings 2 more, so the batch is full and 1
    group is left over; step 2 trains that group first (counted as carried) and samples only 3 prompts."""
    from nanoseek.train.grpo import train
    calls, sizes = [0], []

    def scripted(prompts, completions, problems, **kw):
        calls[0] += 1
        sizes.append(len(completions))
        rewards = [float(i % 2) for i in range(len(completions))]        # every group mixed: a signal
        if calls[0] == 1:
            rewards[12:16] = [0.0] * 4                                     # ...but the 4th group of round 1
        return rewards
    cfg = small_grpo(base, tmp_path, steps=2, prompts_per_step=4, plots=False, save_final=False, eval_n=2,
                     reward_timeout=0, max_refill=1)
    train(cfg, rewards=[scripted])
    recs = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"groups_trained"' in l]
    assert sizes == [16, 8, 12]                 # 4 prompts x G=4, a refill of max(1, 4 // 2) = 2, then 3 at step 2
    assert [r["groups_trained"] for r in recs] == [4, 4] and [r["groups_carried"] for r in recs] == [0, 1]
    assert [r["short_steps"] for r in recs] == [0, 0]


@pytest.mark.slow
def test_main_job_aha_pinned(tmp_path):
    """The main job's recipe without distillation (~5 min on 2 cores): RL lifts greedy pass@1 by >= 30
    points on held-out sums and the reflection rate by >= 5 points, sampled and greedy; reflecting pays in
    the base; and the report carries a rule-picked transcript whose RL side reflects and is right."""
    from nanoseek.train.r1_zero import R1ZeroConfig, r1_zero
    rep = r1_zero(R1ZeroConfig(out=str(tmp_path), distill=False, eval_n=200, reflect_n=100))
    f = rep["reflection"]
    assert rep["accuracy_after"] - rep["accuracy_before"] >= 0.30
    assert f["reflection_rate_after"] - f["reflection_rate_before"] >= 0.05
    assert f["greedy_reflection_rate_after"] - f["greedy_reflection_rate_before"] >= 0.05
    assert f["accuracy_reflecting_before"] > f["accuracy_not_reflecting_before"] + 0.3
    ex = rep["aha_example"]
    assert ex is not None and "wait, check" in ex["rl"] and ex["answer"] in ex["rl"]
