"""The training-path choices in the model, each against the alternative it replaced, in one run:

1. attention: MLA's CPU path (`manual_attention`: one baddbmm with the causal bias, the softmax in the
   scores' dtype, one bmm) vs SDPA, whose CPU fallback runs when v's head dim differs from q/k's (always
   in MLA), and vs the same path with an fp32 softmax round trip (what it had before); forward +
   backward and forward.
2. experts: one MoE layer's expert GEMMs grouped (torch._grouped_mm, `GroupedLinear`) vs padded to the
   busiest expert (batched matmuls), forward + backward, balanced and skewed routes, fp32 and bf16, a
   few token counts (the crossover `MoE.choose_impl` uses).
3. loss: the one-softmax cross-entropy (`train/logprobs.py`) vs `F.cross_entropy(logits.float())`,
   forward + backward with the head GEMM, fp32 and bf16 autocast.
4. rmsnorm: `RMSNorm` (written-out backward) vs autograd through `F.rms_norm`, fp32, forward + backward.

    .venv/bin/python benchmarks/bench_train_kernels.py [--parts attention loss rmsnorm]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from results_io import report


def timed(fn, n: int) -> float:
    """Median seconds of n calls after two warm-ups."""
    fn(), fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def attention(n: int) -> dict:
    from nanoseek.model.mla import additive_mask, manual_attention

    B, H, T, dq, dv = 64, 8, 80, 48, 32          # GRPO's update on the benchmark model: 64 rows x 80 tokens
    out = {"shape": [B, H, T, dq, dv]}
    for dt in (torch.float32, torch.bfloat16):
        q, k = (torch.randn(B, H, T, dq, dtype=dt, requires_grad=True) for _ in range(2))
        v = torch.randn(B, H, T, dv, dtype=dt, requires_grad=True)
        g = torch.randn(B, H, T, dv, dtype=dt)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=dq ** -0.5)

        def ours():                              # MLA.attend_naive's CPU branch
            return manual_attention(q, k, v, None, dq ** -0.5)

        def fp32_softmax():                      # the same with the fp32 round trip it had before
            bias = additive_mask(None, T, T, q.device).to(dt).expand(B, H, T, T).reshape(B * H, T, T)
            s = torch.baddbmm(bias, q.reshape(B * H, T, dq), k.reshape(B * H, T, dq).transpose(1, 2), alpha=dq ** -0.5)
            return torch.bmm(s.float().softmax(-1).to(dt), v.reshape(B * H, T, dv)).view(B, H, T, dv)
        err = float((ours().float() - sdpa().float()).abs().max())
        row = {"max_abs_diff": err}
        for name, f in (("sdpa", sdpa), ("ours", ours), ("fp32_softmax", fp32_softmax)):
            row[f"{name}_fwd_bwd_ms"] = round(1000 * timed(lambda: f().backward(g), n), 2)
            with torch.no_grad():
                row[f"{name}_fwd_ms"] = round(1000 * timed(f, n), 2)
        row["speedup_fwd_bwd"] = round(row["sdpa_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"], 2)
        row["speedup_fwd"] = round(row["sdpa_fwd_ms"] / row["ours_fwd_ms"], 2)
        row["speedup_fwd_bwd_vs_fp32_softmax"] = round(row["fp32_softmax_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"], 2)
        out[str(dt).removeprefix("torch.")] = row
    return out


def loss(n: int) -> dict:
    from nanoseek.train.logprobs import cross_entropy_sum

    M, D, V = 2048, 320, 4096                    # `small`'s head over a batch of 8 x 256
    torch.manual_seed(0)
    W = torch.randn(V, D) * 0.02
    y = torch.randint(0, V, (M,))
    out = {"shape": [M, D, V]}
    for dt in (torch.float32, torch.bfloat16):
        h = torch.randn(M, D, requires_grad=True)
        row = {}
        for name, ce in (("torch", lambda z: F.cross_entropy(z.float(), y, reduction="sum")),
                         ("ours", lambda z: cross_entropy_sum(z, y))):
            def step():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
                    z = F.linear(h, W)
                ce(z).backward()
            row[f"{name}_fwd_bwd_ms"] = round(1000 * timed(step, n), 2)
        row["speedup"] = round(row["torch_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"], 2)
        out[str(dt).removeprefix("torch.")] = row
    return out


def rmsnorm(n: int) -> dict:
    from nanoseek.model.layers import RMSNorm

    out = {}
    for shape in ((8, 256, 320), (64, 80, 256)):   # `small` 8 x 256; GRPO's update on the benchmark model
        norm = RMSNorm(shape[-1])
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        row = {}
        for name, f in (("torch", lambda: F.rms_norm(x, (shape[-1],), norm.weight, norm.eps)), ("ours", lambda: norm(x))):
            row[f"{name}_fwd_bwd_ms"] = round(1000 * timed(lambda: f().backward(g), n), 3)
        row["speedup"] = round(row["torch_fwd_bwd_ms"] / row["ours_fwd_bwd_ms"], 2)
        out["x".join(map(str, shape))] = row
    return out




def experts(n: int) -> dict:
    from nanoseek.model.moe import sorted_experts

    E, D, F_, K = 16, 256, 128, 4                # the benchmark model's MoE layer
    torch.manual_seed(0)
    w13 = torch.randn(E, 2 * F_, D, requires_grad=True)
    w2 = torch.randn(E, D, F_, requires_grad=True)
    out = {"experts": E, "top_k": K, "hidden": D, "expert_width": F_}
    for T in (64, 256, 1024, 5120):
        for routes in ("balanced", "skewed"):
            p = torch.ones(E) if routes == "balanced" else torch.rand(E) ** 2 + 0.1
            # fresh routes every call, as in training (bf16 kernels are JIT-compiled per shape)
            draws = [torch.multinomial(p.expand(T, E), K) for _ in range(n + 2)]
            for dt in (torch.float32, torch.bfloat16):
                row = {}
                for impl in ("grouped", "padded"):
                    it = iter(draws * 2)

                    def step():
                        x = torch.randn(T, D, requires_grad=True)
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == torch.bfloat16):
                            y = sorted_experts(x, torch.rand(T, K), next(it), w13, w2, impl)
                        y.float().sum().backward()
                    row[f"{impl}_ms"] = round(1000 * timed(step, n), 2)
                row["grouped_over_padded"] = round(row["grouped_ms"] / row["padded_ms"], 2)
                out[f"T{T}_{routes}_{str(dt).removeprefix('torch.')}"] = row
    return out


PARTS = {"attention": attention, "experts": experts, "loss": loss, "rmsnorm": rmsnorm}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="timed calls per case (median reported)")
    ap.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="which parts to run")
    args = ap.parse_args()
    from bench_decode import cpu_model

    from nanoseek.common import tune_cpu_allocator
    res = {"host": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "allocator": "tuned" if tune_cpu_allocator() else "system"}
    res.update({part: PARTS[part](args.n) for part in args.parts})
    report("bench_train_kernels" + ("" if args.parts == list(PARTS) else "_" + "_".join(args.parts)), res)


if __name__ == "__main__":
    main()
