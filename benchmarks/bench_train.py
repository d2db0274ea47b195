"""Training throughput: nanoseek vs HF transformers' DeepseekV3ForCausalLM, same config, same batch, one run.

Both do forward + backward + AdamW on the same random tokens. HF runs fp32 eager (its default) and
bf16 autocast; nanoseek runs its default (the dtype `nanoseek.calibrate` measured faster on this host,
what `nanoseek pretrain` uses without --dtype), the same with its blocks compiled (what `pretrain
--compile auto` switches to when the run is long enough; compile time excluded, reported), fp32 and
bf16 autocast (fp32 master weights always), without and with the MTP loss. Blocks of steps alternate between the contenders so drift in machine
speed hits all of them.

    .venv/bin/python benchmarks/bench_train.py --preset small --batch 8 --seq 256
"""
import argparse
import time

import torch
from results_io import report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per block")
    ap.add_argument("--blocks", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(torch.get_num_threads())
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from bench_decode import cpu_model

    from nanoseek.common import compute_dtype, tune_cpu_allocator
    from nanoseek.config import load_preset
    from nanoseek.model import Transformer
    from nanoseek.model.moe import update_bias
    from nanoseek.train.compiled import StepCompiler
    from nanoseek.train.optim import build_optimizer
    from nanoseek.train.losses import forward_losses
    from nanoseek.train.pretrain import PretrainConfig

    # what `nanoseek pretrain` does at start-up; both contenders share this process and so this allocator
    # (NANOSEEK_MALLOC=system measures glibc's defaults)
    allocator = "tuned" if tune_cpu_allocator() else "system"
    cfg = load_preset(args.preset)
    hf_cfg = DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    hf = DeepseekV3ForCausalLM(hf_cfg).train()
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
    ours = Transformer(cfg).init_weights(0).train()
    our_opt = build_optimizer(ours, 1e-4)
    # the same model with its blocks compiled, as `pretrain --compile auto` does for runs long enough
    compiled = Transformer(cfg).init_weights(0).train()
    compiled_opt = build_optimizer(compiled, 1e-4)
    StepCompiler(compiled, "on")
    B, T = args.batch, args.seq
    batch = torch.randint(0, cfg.vocab_size, (B, T + 1))

    default = compute_dtype(torch.device("cpu"), None, cfg.hidden_size, B * T)

    def hf_step(dtype=torch.float32):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = hf(batch[:, :-1], labels=batch[:, :-1])
        out.loss.backward()
        hf_opt.step()
        hf_opt.zero_grad()

    def our_step(dtype, mtp, model=ours, opt=our_opt):
        pc = PretrainConfig(mtp_lambda=0.3 if mtp else 0.0)
        ctx = torch.autocast("cpu", dtype=dtype) if dtype != torch.float32 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = forward_losses(model, batch, pc)["total"]
        loss.backward()
        opt.step()
        opt.zero_grad()
        for m in model.moe_layers():
            update_bias(m, 1e-3)

    contenders = {
        "hf_fp32": hf_step,
        "hf_bf16": lambda: hf_step(torch.bfloat16),
        "nanoseek_default": lambda: our_step(default, False),
        "nanoseek_default_compiled": lambda: our_step(default, False, compiled, compiled_opt),
        "nanoseek_fp32": lambda: our_step(torch.float32, False),
        "nanoseek_bf16": lambda: our_step(torch.bfloat16, False),
        "nanoseek_bf16_mtp": lambda: our_step(torch.bfloat16, True),
        "nanoseek_fp32_mtp": lambda: our_step(torch.float32, True),
    }
    times = {k: [] for k in contenders}
    compile_s = 0.0
    for k, f in contenders.items():
        t = time.perf_counter()
        f()                                    # warm-up (compiles the compiled contender)
        if k == "nanoseek_default_compiled":
            compile_s = time.perf_counter() - t
    for _ in range(args.blocks):
        for k, f in contenders.items():
            t = time.perf_counter()
            for _ in range(args.steps):
                f()
            times[k].append((time.perf_counter() - t) / args.steps)
    tok_s = {k: round(B * T / min(v), 1) for k, v in times.items()}
    res = {"preset": args.preset, "params": ours.num_params(), "batch": B, "seq": T,
           "default_dtype": str(default).removeprefix("torch."), "compile_s": round(compile_s, 1),
           "tokens_per_s": tok_s,
           "speedup_vs_hf_fp32": {k: round(v / tok_s["hf_fp32"], 2) for k, v in tok_s.items()},
           "torch": torch.__version__, "threads": torch.get_num_threads(), "host": cpu_model(),
           "allocator": allocator}
    report("bench_train" if allocator == "tuned" else "bench_train_system_malloc", res)


if __name__ == "__main__":
    main()
