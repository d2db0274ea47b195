"""Distributed training (nanoseek/distributed/) against one process: FSDP2, expert parallelism and the
pipeline schedules reproduce the single-process loss curve of the same global batch; checkpoints
resume on another world size; bad layouts fail before anything can hang. Ranks are real processes
(torchrun, gloo, CPU, fp32)."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import nanoseek_cli
from nanoseek.common import UserError
from nanoseek.config import load_preset
from nanoseek.distributed.mesh import Layout, check_layout
from nanoseek.train.pretrain import PretrainConfig, pretrain

ROOT = Path(__file__).resolve().parents[1]
RUN = dict(n_docs=2000, batch_size=8, seq_len=64, eval_every=0, plots=False, dtype="float32", compile="off",
           max_steps=12, warmup=2)
KEYS = ("loss", "mtp_loss", "grad_norm")          # balance_loss is ~4e-4, logged to 5 decimals


def flags(d: dict) -> list[str]:
    out = []
    for k, v in d.items():
        flag = "--" + k.replace("_", "-")
        out += ([flag] if v else ["--no-" + flag[2:]]) if isinstance(v, bool) else [flag, str(v)]
    return out


ENV = {"OMP_NUM_THREADS": "1", "NANOSEEK_DIST_TIMEOUT_S": "90", "NANOSEEK_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}


def torchrun(n: int, out: Path, *extra: str, preset: str = "tiny", launcher: bool = False, **over) -> None:
    """`nanoseek pretrain` on n ranks. By default the ranks are started here with the environment torchrun
    gives them (RANK, WORLD_SIZE, a rendezvous address: all nanoseek reads), which saves the launcher's own
    interpreter (~3 s a run on 2 cores); `launcher=True` goes through torchrun itself."""
    args = ["pretrain", "--preset", preset, "--out", str(out), *flags({**RUN, **over}), *extra]
    if launcher:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                            "-m", "nanoseek", *args], env={**os.environ, **ENV}, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    else:
        ranks(n, [sys.executable, "-m", "nanoseek", *args], out)


def ranks(n: int, cmd: list[str], out: Path, timeout: float = 300) -> list[str]:
    """Run cmd as ranks 0..n-1 of one process group on this host -> each rank's output. The first rank to
    fail stops the rest (as torchrun does), and the failure shows every rank's last output."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logs = out.parent / f".{out.name}-ranks"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(n):
        env = {**os.environ, **ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n),
               "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(logs / f"{r}.log", "w") as f:
            procs.append(subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT))
    deadline, failed = time.monotonic() + timeout, False
    try:
        while any(p.poll() is None for p in procs) and not failed and time.monotonic() < deadline:
            failed = any(p.poll() not in (None, 0) for p in procs)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes, outputs = [p.returncode for p in procs], [(logs / f"{r}.log").read_text() for r in range(n)]
    assert codes == [0] * n, (codes, "\n".join(f"--- rank {r}:\n{o[-3000:]}" for r, o in enumerate(outputs)))
    return outputs


def metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


def assert_same_curve(ref: Path, run: Path, rtol: float = 1e-4) -> None:
    a, b = metrics(ref), metrics(run)
    assert len(a) == len(b) == RUN["max_steps"]
    for x, y in zip(a, b):
        for k in KEYS:
            if k in x:
                assert abs(x[k] - y[k]) <= rtol * abs(x[k]) + 1e-5, (x["step"], k, x[k], y[k])
        assert x["max_violation"] == y["max_violation"], x["step"]    # the bias update saw the global load
    assert abs(a[-1]["val_loss"] - b[-1]["val_loss"]) <= rtol * a[-1]["val_loss"]


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory) -> str:
    """tiny with 4 layers: 2 pipeline ranks x 2 stages each (V shape) need 4."""
    cfg = json.loads((ROOT / "configs" / "tiny.json").read_text())
    cfg["num_hidden_layers"] = 4
    path = tmp_path_factory.mktemp("cfg") / "tiny4.json"
    path.write_text(json.dumps(cfg))
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny4):
    """Single-process runs of the same global batch (tiny, and tiny with 4 layers)."""
    base = tmp_path_factory.mktemp("ref")
    pretrain(PretrainConfig(preset="tiny", out=str(base / "tiny"), **RUN))
    pretrain(PretrainConfig(preset=tiny4, out=str(base / "tiny4"), **RUN))
    return base


def param_and_optimizer_bytes(summary: dict) -> list[int]:
    return [m["param_bytes"] + m["optimizer_bytes"] for m in summary["rank_memory"]]


@pytest.fixture(scope="module")
def fsdp_ep_run(tmp_path_factory) -> Path:
    """2 ranks, FSDP + EP, checkpoints at steps 6 and 12 (read by several tests; copy before changing it)."""
    out = tmp_path_factory.mktemp("fsdp-ep") / "run"
    torchrun(2, out, "--dp-shard", "2", "--ep", "2", save_every=6, keep=5)
    return out


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory) -> Path:
    """2 ranks, EP, checkpoints at steps 6 and 12 (copy before changing it)."""
    out = tmp_path_factory.mktemp("ep") / "run"
    torchrun(2, out, "--ep", "2", save_every=6, keep=5)
    return out


def test_fsdp_matches_one_process_and_halves_memory(reference, tmp_path):
    torchrun(2, tmp_path, "--dp-shard", "2", launcher=True)          # this one through torchrun itself
    assert_same_curve(reference / "tiny", tmp_path)
    one = param_and_optimizer_bytes(json.loads((reference / "tiny" / "summary.json").read_text()))[0]
    per_rank = param_and_optimizer_bytes(json.loads((tmp_path / "summary.json").read_text()))
    assert len(per_rank) == 2 and all(0.49 < r / one < 0.51 for r in per_rank), (one, per_rank)


def test_expert_parallel_matches_one_process(reference, ep_run):
    assert_same_curve(reference / "tiny", ep_run)


def test_dualpipev_matches_one_process_with_mtp(reference, tiny4, tmp_path):
    torchrun(2, tmp_path, "--pp", "2", "--pp-schedule", "dualpipev", preset=tiny4)
    assert_same_curve(reference / "tiny4", tmp_path)


def test_resume_on_another_world_size(reference, fsdp_ep_run, tmp_path):
    """Saved by 2 ranks (FSDP + EP), resumed by 1: the next losses are the uninterrupted run's."""
    run = shutil.copytree(fsdp_ep_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_000012")      # as if the run died after step 6
    torchrun(1, run, "--resume")
    assert [r["step"] for r in metrics(run)] == list(range(1, 13))
    assert_same_curve(reference / "tiny", run)


def test_eplb_placement_applied_at_a_checkpoint_boundary(reference, ep_run, tmp_path):
    """Resume an --ep 2 run with the placement `nanoseek eplb` computed from its recorded loads: the experts
    move between ranks, the losses stay those of one process, the rank-load imbalance is logged."""
    from nanoseek.distributed.eplb import main as eplb
    run = shutil.copytree(ep_run, tmp_path / "run")
    shutil.rmtree(run / "checkpoints" / "step_000012")
    rec = json.loads((run / "expert_load.json").read_text())
    assert rec["layers"] == [1, 2] and len(rec["load"][0]) == 8
    plan = eplb(["--run", str(run), "--ranks", "2", "--redundant", "0"])
    assert plan["phy2log"] != [list(range(8))] * 2                      # it does move experts
    torchrun(2, run, "--ep", "2", "--resume", "--ep-placement", str(run / "eplb.json"))
    assert_same_curve(reference / "tiny", run)
    assert all("ep_rank_imbalance" in r for r in metrics(run))
    same_weights(reference / "tiny" / "final", run / "final")           # exported in logical order
    with pytest.raises(UserError, match="redundant"):
        from nanoseek.distributed.expert_parallel import load_placement
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({**plan, "redundant": 2}))
        load_placement(bad, 2, load_preset("tiny"))


def test_export_is_the_one_process_model(reference, fsdp_ep_run, tmp_path):
    """The HF export gathered from 2 FSDP + EP ranks holds the weights one process trained."""
    same_weights(reference / "tiny" / "final", fsdp_ep_run / "final")
    # and `nanoseek export` reads the sharded DCP checkpoint in one process into the same model
    assert nanoseek_cli("export", fsdp_ep_run, "--out", tmp_path / "exported").returncode == 0
    same_weights(reference / "tiny" / "final", tmp_path / "exported")
    assert (tmp_path / "exported" / "tokenizer.json").exists()
    bad = nanoseek_cli("export", fsdp_ep_run / "final", "--out", tmp_path / "x")        # not a checkpoint
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def same_weights(a_dir: Path, b_dir: Path, atol: float = 1e-5) -> None:
    """The weights agree to summation order: a rank's partial gradient sums round differently from one
    process's, and Adam's normalisation turns that into ~1e-6 in the weights after 12 steps (0 on the
    Xeons this was first run on; 3.0e-6 in the MTP eh_proj on an AVX2-only AMD EPYC, at weights ~0.01,
    where rtol 1e-4 alone allows 1e-6). A wrong shard or placement is off by a whole update (~lr)."""
    from safetensors.torch import load_file
    a, b = load_file(a_dir / "model.safetensors"), load_file(b_dir / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=atol), (k, (a[k] - b[k]).abs().max())


def test_expert_parallel_layer_with_an_empty_rank(tmp_path):
    """One MoE layer under EP == the layer in one process (output, input and expert gradients), with a
    router that sends every token to rank 0's experts: rank 1 receives nothing and gets zero gradients."""
    outputs = ranks(2, [sys.executable, str(ROOT / "tests" / "ep_unit_worker.py")], tmp_path / "ep-unit", timeout=120)
    assert [o.count("ok=True") for o in outputs] == [1, 1], outputs


def test_sft_fsdp_and_ep_match_one_process(reference, tmp_path):
    """`nanoseek sft --dp-shard 2 --ep 2` on 2 ranks: the per-step losses and the fine-tuned weights of one process."""
    from nanoseek.data.tasks import get_task
    task = get_task("arithmetic", min_digits=1, max_digits=2)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p.question},
                                                     {"role": "assistant", "content": task.worked_solution(p)}]}) + "\n"
                            for p in task.problems(48, seed=0, split="train")))
    args = ["sft", "--model", str(reference / "tiny" / "final"), "--data", str(data), "--epochs", "2",
            "--batch-size", "8", "--lr", "3e-3", "--dtype", "float32"]
    r = nanoseek_cli(*args, "--out", tmp_path / "one")
    assert r.returncode == 0, r.stderr[-4000:]
    ranks(2, [sys.executable, "-m", "nanoseek", *args, "--out", str(tmp_path / "two"), "--dp-shard", "2", "--ep", "2"],
          tmp_path / "two")
    a = json.loads((tmp_path / "one" / "summary.json").read_text())["losses"]
    b = json.loads((tmp_path / "two" / "summary.json").read_text())["losses"]
    assert len(a) == len(b) == 12 and a[-1] < a[0]
    assert all(abs(x - y) <= 1e-4 * abs(x) for x, y in zip(a, b)), (a, b)
    # weights ~0.1: summation-order differences of ~1e-7 in a gradient come out of Adam's normalisation
    # as up to ~1e-5 after 12 steps (measured 8e-6)
    same_weights(tmp_path / "one" / "final", tmp_path / "two" / "final", atol=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "zbv"])
def test_other_schedules_match_one_process(tiny4, tmp_path, schedule):
    ref = tmp_path / "ref"
    pretrain(PretrainConfig(preset=tiny4, out=str(ref), mtp_lambda=0.0, **RUN))
    torchrun(2, tmp_path / "pp", "--pp", "2", "--pp-schedule", schedule, preset=tiny4, mtp_lambda=0.0)
    assert_same_curve(ref, tmp_path / "pp")


@pytest.mark.slow
def test_four_ranks_two_axes(reference, tiny4, tmp_path):
    """4 processes: FSDP x EP (dp 4 = shard 2 x replicate 2, ep 2), and pipeline x data parallel."""
    torchrun(4, tmp_path / "a", "--dp-shard", "2", "--ep", "2")
    assert_same_curve(reference / "tiny", tmp_path / "a")
    torchrun(4, tmp_path / "b", "--pp", "2", "--ep", "2", preset=tiny4)
    assert_same_curve(reference / "tiny4", tmp_path / "b")


@pytest.mark.slow
def test_pipeline_checkpoint_resumes_under_expert_parallel(reference, tiny4, tmp_path):
    torchrun(2, tmp_path, "--pp", "2", preset=tiny4, save_every=6, keep=5)
    shutil.rmtree(tmp_path / "checkpoints" / "step_000012")
    torchrun(2, tmp_path, "--ep", "2", "--resume", preset=tiny4)
    assert_same_curve(reference / "tiny4", tmp_path)


# ------------------------------------------------------------------------------------------------
# layouts refused before any process group exists

@pytest.mark.parametrize("layout, batch, mtp, words", [
    (Layout(world=3, pp=2), 8, False, ["--pp 2", "world size 3"]),
    (Layout(world=4, dp_shard=3), 8, False, ["--dp-shard 3", "divisor of 4"]),
    (Layout(world=2, ep=2), 7, False, ["--batch-size 7", "multiple of 2"]),
    (Layout(world=6, ep=3), 6, False, ["--ep 3", "n_routed_experts=8"]),
    (Layout(world=2, pp=2, pp_schedule="dualpipev"), 8, True, ["4 stages", "num_hidden_layers=2"]),
    (Layout(world=2, pp=2, pp_schedule="1f1b"), 8, True, ["MTP", "dualpipev"]),
    (Layout(world=2, pp=2, pp_schedule="1f1b", pp_microbatches=3), 8, False, ["--pp-microbatches 3"]),
    (Layout(world=4, pp=2, dp_shard=2, pp_schedule="1f1b"), 8, False, ["--dp-shard 2 with --pp 2"]),
    (Layout(world=2, pp=2, pp_schedule="interleaved", pp_microbatches=5), 10, False, ["--pp-microbatches 5"]),
])
def test_bad_layouts_name_the_flag(layout, batch, mtp, words):
    cfg = load_preset("tiny")
    if layout.pp_schedule == "interleaved":
        cfg = cfg.replace(num_hidden_layers=4)           # 2 stages per rank
    with pytest.raises(UserError) as e:
        check_layout(layout, cfg, batch, mtp)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("args, words", [
    (["--ep", "2"], "torchrun --nproc_per_node 2"),
    (["--dp-shard", "2", "--ep", "2"], "torchrun --nproc_per_node 2"),       # EP borrows the data-parallel ranks
    (["--ep-placement", "eplb.json"], "add --ep N"),
])
def test_parallel_flags_without_torchrun_say_how_to_launch(tmp_path, args, words):
    r = nanoseek_cli("pretrain", *args, "--out", tmp_path)
    assert r.returncode == 2 and words in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_resume_refuses_the_other_launch_mode(tmp_path, ep_run):
    """A one-process run's checkpoints resumed under torchrun (and the reverse) is an error naming the
    launch to use - not a silent fresh start that truncates the run's metrics. (The distributed side: a
    copy of the module's EP run; both refusals come before any training.)"""
    one, dcp_run = tmp_path / "one", tmp_path / "dcp"
    short = {**RUN, "max_steps": 2}
    pretrain(PretrainConfig(preset="tiny", out=str(one), **short))
    with pytest.raises(AssertionError, match="one-process run") as refused:   # `ranks` asserts every rank exits 0
        ranks(1, [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--out", str(one), "--resume",
                  *flags({**RUN, "max_steps": 4})], tmp_path / "logs")
    assert "Traceback" not in str(refused.value)
    assert len(metrics(one)) == 2
    shutil.copytree(ep_run, dcp_run)
    with pytest.raises(UserError, match="resume under torchrun"):
        pretrain(PretrainConfig(preset="tiny", out=str(dcp_run), resume=True, **{**RUN, "max_steps": 16}))
    assert len(metrics(dcp_run)) == len(metrics(ep_run))


def test_placement_for_another_model_is_refused(tmp_path):
    from nanoseek.distributed.expert_parallel import load_placement
    f = tmp_path / "eplb.json"
    f.write_text(json.dumps({"layers": [0], "phy2log": [list(range(8))], "ranks": 2, "redundant": 0}))
    with pytest.raises(UserError, match="layer 0 is not a MoE layer"):
        load_placement(f, 2, load_preset("tiny"))
    f.write_text(json.dumps({"layers": [1], "phy2log": [list(range(8))], "ranks": 4, "redundant": 0}))
    with pytest.raises(UserError, match="made for 4 ranks"):
        load_placement(f, 2, load_preset("tiny"))
