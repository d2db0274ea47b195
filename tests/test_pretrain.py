"""Pretraining: it learns, it resumes bit-for-bit, it survives SIGKILL, it refuses bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import nanoseek_cli
from nanoseek.checkpoint.state import CorruptCheckpoint, list_checkpoints, load_checkpoint, load_latest
from nanoseek.common import UserError
from nanoseek.train.pretrain import PretrainConfig, pretrain

FAST = dict(preset="tiny", n_docs=2000, batch_size=8, seq_len=64, eval_every=0, plots=False, dtype="float32")


def losses(out):
    return [json.loads(l)["loss"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_tiny_loss_falls(tmp_path):
    s = pretrain(PretrainConfig(out=str(tmp_path), max_steps=40, lr=5e-3, warmup=5, **FAST))
    assert s["final_loss"] < 0.8 * s["first_loss"]
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("step", "loss", "mtp_loss", "lr", "grad_norm", "tokens_per_s", "max_violation", "val_loss"):
        assert key in rec, key
    assert len(rec["max_violation"]) == 2                  # one MoE layer + the MTP block's MoE
    assert (tmp_path / "final" / "config.json").exists() and (tmp_path / "final" / "tokenizer.json").exists()


def test_resume_reproduces_losses_exactly(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    cfg = dict(max_steps=10, lr=3e-3, warmup=2, **FAST)
    pretrain(PretrainConfig(out=str(a), **cfg))
    pretrain(PretrainConfig(out=str(b), save_every=4, keep=5, **cfg))
    # pretend the run died right after step 4: keep only that checkpoint and the metrics up to it
    for ck in list_checkpoints(b / "checkpoints"):
        if "step_000004" not in ck.name:
            ck.unlink()
    pretrain(PretrainConfig(out=str(b), resume=True, **cfg))
    assert losses(a) == losses(b)
    assert len(losses(b)) == 10


def test_sigkill_during_saving_resumes_from_last_complete(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--out", str(out), "--max-steps", "400",
           "--n-docs", "2000", "--batch-size", "8", "--seq-len", "64", "--save-every", "1", "--eval-every", "0",
           "--no-plots", "--dtype", "float32"]
    env = dict(os.environ, NANOSEEK_NO_PROGRESS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list_checkpoints(out / "checkpoints")) < 2:
        time.sleep(0.05)
    time.sleep(0.37)                       # land somewhere inside a step or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list_checkpoints(out / "checkpoints")
    assert done, "no checkpoint was written before the kill"
    last_step = load_checkpoint(done[-1])["step"]
    state, path = load_latest(out / "checkpoints")
    assert state["step"] == last_step
    s = pretrain(PretrainConfig(out=str(out), resume=True, max_steps=last_step + 3, **FAST))
    assert s["steps"] == last_step + 3
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last_step + 4))
    assert not list((out / "checkpoints").glob("*.tmp"))


def test_corrupt_checkpoint_is_named_and_skipped(tmp_path, capsys):
    pretrain(PretrainConfig(out=str(tmp_path), max_steps=4, save_every=2, keep=3, **FAST))
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    newest = ckpts[-1]
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpoint, match=newest.name):
        load_checkpoint(newest)
    state, path = load_latest(tmp_path / "checkpoints")
    assert path == ckpts[-2]
    assert newest.name in capsys.readouterr().err


def test_nonfinite_steps_stop_with_a_clear_message(tmp_path, monkeypatch):
    import nanoseek.train.pretrain as P
    real = P.forward_losses

    def nan_losses(*a, **k):
        d = real(*a, **k)
        d["total"] = d["total"] * float("nan")
        return d
    monkeypatch.setattr(P, "forward_losses", nan_losses)
    with pytest.raises(UserError, match="non-finite"):
        pretrain(PretrainConfig(out=str(tmp_path), max_steps=20, max_bad_steps=3, **FAST))


def test_bad_flags(tmp_path):
    with pytest.raises(UserError, match="fp8-scales"):
        pretrain(PretrainConfig(out=str(tmp_path), fp8=True, fp8_scales="e5m2", **FAST))
    with pytest.raises(UserError, match="adam-moments"):
        pretrain(PretrainConfig(out=str(tmp_path), adam_moments="fp16", **FAST))
    with pytest.raises(UserError, match="batch-size"):
        pretrain(PretrainConfig(out=str(tmp_path), max_steps=2, **{**FAST, "batch_size": 0}))
    r = nanoseek_cli("pretrain", "--preset", "nope", "--out", tmp_path, "--n-docs", "500")
    assert r.returncode == 2 and "unknown preset" in r.stderr and "Traceback" not in r.stderr


def test_user_data_files(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    lines = [json.dumps({"text": f"the number {i} is {'even' if i % 2 == 0 else 'odd'}."}) for i in range(400)]
    lines.insert(3, "{broken json")
    docs.write_text("\n".join(lines) + "\n")
    s = pretrain(PretrainConfig(out=str(tmp_path / "run"), data=str(docs), max_steps=3, vocab_size=300, **FAST))
    assert s["steps"] == 3
    assert f"{docs}:4:" in capsys.readouterr().err           # the broken line, named and skipped


def test_mtp_off_and_dense_models_train(tmp_path):
    """--mtp-lambda 0 leaves the MTP block's MoE idle; a dense model has no MoE at all."""
    s = pretrain(PretrainConfig(out=str(tmp_path / "a"), max_steps=2, mtp_lambda=0.0, **FAST))
    assert s["steps"] == 2
    s = pretrain(PretrainConfig(out=str(tmp_path / "b"), max_steps=2, **{**FAST, "preset": "mini-dense"}))
    assert s["steps"] == 2
