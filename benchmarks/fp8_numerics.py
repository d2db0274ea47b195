"""FP8 numerics in figures (CPU emulation; calc_diff is DeepGEMM's metric, 0 = identical):

1. each block linear of a freshly initialised `small` model, FP8 vs fp32 on the same input;
2. a few "massive activation" tokens: 1x128 tiles vs one scale per tensor, on the ordinary tokens;
3. the last hidden state through the whole model: FP8, FP8 with every layer dense, bf16 autocast;
4. gradients: FP8 with all three GEMMs in FP8, and with exact (dequantized, fp32) backward GEMMs.

    .venv/bin/python benchmarks/fp8_numerics.py        # writes benchmarks/results/fp8_numerics.json
"""
import copy

import torch
import torch.nn.functional as F
from results_io import report


def main():
    from bench_fp8 import cpu_name
    from nanoseek.config import load_preset
    from nanoseek.model import Transformer
    from nanoseek.quant import fp8

    res = {"host": cpu_name(), "command": "benchmarks/fp8_numerics.py"}
    torch.manual_seed(0)
    base = Transformer(load_preset("small")).init_weights(0).eval()
    ids = torch.randint(3, base.cfg.vocab_size, (8, 128))

    # 1. per linear
    m = copy.deepcopy(base)
    fp8.convert(m)
    diffs = []
    hooks = [mod.register_forward_hook(lambda mod, inp, out: diffs.append(
        fp8.calc_diff(out, F.linear(inp[0].float(), mod.weight.float()))))
        for mod in m.modules() if isinstance(mod, fp8.FP8Linear)]
    with torch.no_grad():
        m.hidden(ids)
    for h in hooks:
        h.remove()
    res["per_linear"] = {"linears": len(diffs), "min": min(diffs), "max": max(diffs)}

    # 2. outlier tokens
    g = torch.Generator().manual_seed(1)
    res["outlier_tokens"] = {}
    for mult in (1e4, 3e4):
        x = torch.randn(512, 1024, generator=g)
        out = torch.randperm(512, generator=g)[:8]
        x[out] *= mult
        w = 0.02 * torch.randn(512, 1024, generator=g)
        ref = x @ w.T
        ordinary = torch.ones(512, dtype=torch.bool)
        ordinary[out] = False
        fine = fp8.matmul(fp8.quantize(x, fp8.ACT), fp8.quantize(w, fp8.WEIGHT), torch.float32)
        tensor = fp8.matmul(fp8.quantize(x, (512, 1024)), fp8.quantize(w, (512, 1024)), torch.float32)
        res["outlier_tokens"][f"{mult:.0e}x"] = {"tiles_1x128": fp8.calc_diff(fine[ordinary], ref[ordinary]),
                                                 "per_tensor": fp8.calc_diff(tensor[ordinary], ref[ordinary])}

    # 3. through the model
    def hidden(model, dtype=None):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            return model.hidden(ids).float()
    ref = hidden(base)
    dense = Transformer(load_preset("small", first_k_dense_replace=6)).init_weights(0).eval()
    dense8 = copy.deepcopy(dense)
    fp8.convert(dense8)
    res["last_hidden_vs_fp32"] = {"fp8": fp8.calc_diff(hidden(m), ref),
                                  "fp8_all_layers_dense": fp8.calc_diff(hidden(dense8), hidden(dense)),
                                  "bf16_autocast": fp8.calc_diff(hidden(base, torch.bfloat16), ref)}

    # 4. gradients
    def grads(model):
        model = copy.deepcopy(model).train()
        loss = F.cross_entropy(model.logits(model.hidden(ids[:, :-1])).flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    g32, g8 = grads(base), grads(m)
    real = fp8._FP8Matmul.backward

    def exact_backward(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        x, w = fp8.dequantize(fp8.QTensor(xq, xs, fp8.ACT)), fp8.dequantize(fp8.QTensor(wq, ws, fp8.WEIGHT))
        dw = dy.float().transpose(-1, -2) @ x
        if w.dim() == 2 and dw.dim() > 2:
            dw = dw.sum(dim=tuple(range(dw.dim() - 2)))
        return (dy.float() @ w).to(ctx.dtypes[0]), dw.to(ctx.dtypes[1]), None, None
    fp8._FP8Matmul.backward = staticmethod(exact_backward)
    try:
        g8f = grads(m)
    finally:
        fp8._FP8Matmul.backward = real
    names = ["layers.0.attn.wq_a.weight", "layers.5.attn.wo.weight", "layers.5.ffn.experts.w13",
             "layers.5.ffn.gate.weight", "head.weight"]
    res["grad_vs_fp32"] = {n: {"fp8": fp8.calc_diff(g8[n], g32[n]), "fp8_forward_only": fp8.calc_diff(g8f[n], g32[n])}
                           for n in names}
    report("fp8_numerics", res)


if __name__ == "__main__":
    main()
