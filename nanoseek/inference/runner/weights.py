"""The decode step's weights, derived from the model and owned by the runner.

The model stores what training needs; a decode step wants the same maths laid out for few rows:

  MLA, folded (V2 paper App. C): W_UK goes into the query projection and W_UV into W_O, so a step
      is three GEMMs and no per-head einsums:
          down = [W_DQ ; W_DKV]                     (Q + C + R, D)  one GEMM for both down-projections
          q    = per head [W_UK_h^T W_UQ_nope_h ; W_UQ_rope_h]     (H (C + R), Q)
          out  = per head W_O_h W_UV_h              (D, H C)
      The folded matrices are (C + R) / (N + R) times the size of W_UQ, so folding pays only while C
      is small (our presets); for V3 (C = 512) it would add ~7B parameters and the step uses the
      model's own absorbed attention instead.
  MoE: the router (fp32 always), the shared expert, and for a handful of rows every routed expert's
      [gate; up] stacked into one (E 2F + 2Fs, D) matrix and every down projection into one
      (D, E F + Fs) matrix (`dense_in` / `dense_out`): E/K x the routed FLOPs in two well-shaped
      GEMMs, which wins while a step is bound by reading weights.
  Each GEMM in the kernel's dtype, plus its packed form (runner/gemm.py) where the kernel wants one.

`DecodeWeights.sync()` recomputes everything from the model's current parameters (where a kernel
reads a parameter as it is, in its dtype and layout, it reads the parameter itself); `stale()` is the cheap check (identity,
version counter and address of every parameter) the runner runs before each step as a safety net
behind the explicit `sync_weights()` a trainer calls after its optimizer step. Writes through
`p.data` bypass the version counter and are seen only by an explicit sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...model import Transformer
from ...model.layers import MLP
from ...model.moe import MoE
from . import gemm


PLAN_ROWS = 8


@dataclass
class Gemm:
    """One weight matrix (N, K) of the step: how to compute it from the model (fp32), and the copies
    and packs the chosen kernels read."""
    name: str
    source: object                                   # () -> (N, K) fp32 tensor from the model
    dtype: torch.dtype | None = None                 # the compute dtype, chosen once
    experts_of: int | None = None                    # part of MoE layer i's experts: their dtype
    kinds: dict[int, str] = field(default_factory=dict)                  # rows -> kernel
    weights: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    packs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)   # (kind, rows or 0) -> pack

    @property
    def shape(self) -> tuple[int, int]:
        w = next(iter(self.weights.values()), None)
        return tuple(w.shape) if w is not None else tuple(self.source().shape)


def folding_pays(attn) -> bool:
    return attn.kv_rank + attn.rope_dim <= 2 * (attn.nope + attn.rope_dim)


class DecodeWeights:
    def __init__(self, model: Transformer, device: torch.device, kinds: list[str],
                 dense_moe_max_bytes: int = 256 << 20):
        self.model, self.device, self.kinds = model, device, kinds
        self.gemms: dict[str, Gemm] = {}
        self.stacks: dict[str, torch.Tensor] = {}    # expert stacks for the batched-matmul MoE paths
        self.expert_dtype: dict[int, torch.dtype] = {}   # per MoE layer, for every path (see plan)
        self.folded = [folding_pays(layer.attn) for layer in model.layers]
        self._key = None
        for i, layer in enumerate(model.layers):
            attn = layer.attn
            if self.folded[i]:
                self._add(f"attn{i}.down", lambda a=attn: _down(a))
                self._add(f"attn{i}.q", lambda a=attn: _folded_q(a))
                self._add(f"attn{i}.out", lambda a=attn: _folded_out(a))
            ffn = layer.ffn
            if isinstance(ffn, MoE):
                E, F2, D = ffn.experts.w13.shape
                self._add(f"moe{i}.router", lambda m=ffn: m.gate.weight.float(), only="fp32")
                if ffn.shared is not None:
                    self._add(f"moe{i}.shared_in", lambda m=ffn: m.shared.w13.weight.float(), experts_of=i)
                    self._add(f"moe{i}.shared_out", lambda m=ffn: m.shared.w2.weight.float(), experts_of=i)
                if (E * F2 * D * 2) * 4 <= dense_moe_max_bytes:
                    self._add(f"moe{i}.dense_in", lambda m=ffn: _dense_in(m), experts_of=i)
                    self._add(f"moe{i}.dense_out", lambda m=ffn: _dense_out(m), experts_of=i)
            elif isinstance(ffn, MLP):
                self._add(f"mlp{i}.w13", lambda m=ffn: m.w13.weight.float())
                self._add(f"mlp{i}.w2", lambda m=ffn: m.w2.weight.float())
        self._add("head", lambda: model.head.weight.float())
        self._params = [(m._parameters, n) for m in model.modules() for n, p in m._parameters.items()
                        if p is not None]

    def _add(self, name: str, source, only: str | None = None, experts_of: int | None = None) -> None:
        self.gemms[name] = Gemm(name, source, experts_of=experts_of)
        if only:
            self.gemms[name].kinds = {0: only}
            self.gemms[name].dtype = gemm.DTYPE[only]

    # ---------------------------------------------------------------------------------------------
    def plan(self, rows: int) -> dict[str, str]:
        """Choose (by measurement, cached per host) the kernel of every GEMM for steps of `rows` rows,
        and make the copies and packs it needs. Returns {gemm name: kernel}.
        A GEMM's dtype is chosen once, at PLAN_ROWS rows, and only the kernel within that dtype per row
        count; all of a MoE layer's experts (fused GEMMs, shared expert, the stacks the batched-matmul
        paths read) share the dtype measured for its fused [gate; up] GEMM. A request's tokens then do
        not depend on what else is in the batch, beyond fp32 rounding."""
        for i, layer in enumerate(self.model.layers):
            if isinstance(layer.ffn, MoE) and i not in self.expert_dtype:
                E, F2, D = layer.ffn.experts.w13.shape
                self.expert_dtype[i] = gemm.DTYPE[gemm.fastest(self.device, PLAN_ROWS, D, E * F2, self.kinds)]
        plan = {}
        for g in self.gemms.values():
            if rows not in g.kinds:
                N, K = g.shape
                if g.dtype is None and g.experts_of is not None:
                    g.dtype = self.expert_dtype[g.experts_of]
                elif g.dtype is None:
                    g.dtype = gemm.DTYPE[gemm.fastest(self.device, PLAN_ROWS, K, N, self.kinds)]
                same = [k for k in self.kinds if gemm.DTYPE[k] == g.dtype]
                g.kinds[rows] = g.kinds.get(0) or gemm.fastest(self.device, rows, K, N, same)
            plan[g.name] = g.kinds[rows]
        self.sync(only_missing=True)
        return plan

    def tensors(self, rows: int) -> dict[str, torch.Tensor]:
        """The step's inputs for `rows` rows: each GEMM's weight in its kernel's dtype and its pack."""
        out = dict(self.stacks)
        for g in self.gemms.values():
            kind = g.kinds[rows]
            out[g.name] = g.weights[gemm.DTYPE[kind]]
            pk = g.packs.get(_pack_key(kind, rows))
            if pk is not None:
                out[g.name + ".pack"] = pk
        return out

    def stale(self) -> bool:
        return self._version() != self._key

    def _version(self):
        return [(id(p), p._version, p.data_ptr()) for d, name in self._params for p in (d[name],)]

    @torch.no_grad()
    def sync(self, only_missing: bool = False) -> None:
        """Recompute every derived tensor from the model's parameters (in place where it exists), or
        with `only_missing` just create what a new plan needs."""
        key = self._version()
        full = not only_missing or key != self._key
        with torch.autocast(self.device.type, enabled=False):
            for g in self.gemms.values():
                dtypes = {gemm.DTYPE[k] for k in g.kinds.values()}
                if not full and dtypes <= set(g.weights) and \
                        all(_pack_key(k, r) in g.packs for r, k in g.kinds.items() if k in gemm.PACKED):
                    continue
                w32 = g.source().to(self.device)
                for dt in dtypes:
                    _store(g.weights, dt, w32, dt)
                for rows, kind in g.kinds.items():
                    if kind in gemm.PACKED:
                        g.packs[_pack_key(kind, rows)] = gemm.pack(g.weights[gemm.DTYPE[kind]], kind, max(rows, 1))
            for i, layer in enumerate(self.model.layers):
                if i in self.expert_dtype:
                    ex = layer.ffn.experts
                    _store(self.stacks, f"moe{i}.w13", ex.w13.detach(), self.expert_dtype[i])
                    _store(self.stacks, f"moe{i}.w2", ex.w2.detach(), self.expert_dtype[i])
        self._key = key

    def nbytes(self) -> int:
        """Memory the derived tensors take (copies, packs and stacks; aliases of parameters excluded)."""
        params = {p.data_ptr() for p in self.model.parameters()}
        seen, total = set(), 0
        for t in [*self.stacks.values()] + [t for g in self.gemms.values() for t in (*g.weights.values(),)]:
            if t.data_ptr() not in params and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total + sum(pk.numel() * pk.element_size() for g in self.gemms.values() for pk in g.packs.values())


def _pack_key(kind: str, rows: int) -> tuple[str, int]:
    return (kind, rows if kind == "mkl" else 0)    # MKL packs are made for one row count


def _store(d: dict, key, src: torch.Tensor, dtype: torch.dtype) -> None:
    """d[key] = src in `dtype`: the parameter itself where it already is (live, no copy), else a copy.
    Always a fresh assignment, never a write into an old tensor: the step receives its tensors as
    inputs on every call, so nothing holds on to the old ones."""
    d[key] = src if src.dtype == dtype and src.is_contiguous() else src.to(dtype).contiguous()


# -------------------------------------------------------------------------------------------------
# the derivations (fp32), written against the model's own parameters

def _down(attn) -> torch.Tensor:
    return torch.cat([attn.wq_a.weight, attn.wkv_a.weight]).float() if hasattr(attn, "wq_a") \
        else attn.wkv_a.weight.float()


def _folded_q(attn) -> torch.Tensor:
    H, N, R, C = attn.n_heads, attn.nope, attn.rope_dim, attn.kv_rank
    w_uk = attn._wkv_b_heads(torch.float32)[:, :N]                                     # H,N,C
    q_b = (attn.wq_b.weight if hasattr(attn, "wq_a") else attn.wq.weight).float().view(H, N + R, -1)
    q_lat = torch.einsum("hnc,hnq->hcq", w_uk, q_b[:, :N])                             # W_UK_h^T W_UQ_nope_h
    return torch.cat([q_lat, q_b[:, N:]], dim=1).reshape(H * (C + R), -1)


def _folded_out(attn) -> torch.Tensor:
    H, N, V, C = attn.n_heads, attn.nope, attn.v_dim, attn.kv_rank
    w_uv = attn._wkv_b_heads(torch.float32)[:, N:]                                     # H,V,C
    return torch.einsum("dhv,hvc->dhc", attn.wo.weight.float().view(-1, H, V), w_uv).reshape(-1, H * C)


def _dense_in(moe: MoE) -> torch.Tensor:
    E, F2, D = moe.experts.w13.shape
    shared = [moe.shared.w13.weight.float()] if moe.shared is not None else []
    return torch.cat([moe.experts.w13.float().reshape(E * F2, D)] + shared)


def _dense_out(moe: MoE) -> torch.Tensor:
    D = moe.experts.w2.shape[1]
    shared = [moe.shared.w2.weight.float()] if moe.shared is not None else []
    return torch.cat([moe.experts.w2.float().permute(1, 0, 2).reshape(D, -1)] + shared, dim=1)
