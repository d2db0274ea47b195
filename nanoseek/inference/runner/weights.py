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
      GEMMs, which wins while a step is bound by reading weights; or (`grouped`, where measured faster)
      the expert stacks in panels for the grouped kernel, which computes only the routed rows.
  Each GEMM in the kernel's dtype, plus its packed form (runner/gemm.py) where the kernel wants one,
  and the expert stacks in the dtype the batched-matmul MoE paths run in. `plan(rows)` decides which
  of these a batch size needs (measured, runner/gemm.py) and only those are built.

`sync()` recomputes everything from the model's current parameters (where a kernel reads a parameter
as it is, in its dtype and layout, it reads the parameter itself); `stale()` is the cheap check
(identity, version counter and address of every parameter) the runner runs before each step as a
safety net behind the explicit `sync_weights()` a trainer calls after its optimizer step. Writes
through `p.data` bypass the version counter and are seen only by an explicit sync.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...model import Transformer
from ...model.layers import MLP
from ...model.moe import MoE
from ... import calibrate
from ...quant.fp8 import WEIGHT, quantize
from . import gemm
from .moe import capacity, choose_path, grouped_pays, layers_on


@dataclass
class Gemm:
    """One weight matrix (N, K) of the step: how to compute it from the model (fp32), and the copies
    and packs the chosen kernels read."""
    name: str
    source: object                                   # () -> (N, K) fp32 tensor from the model
    only: str | None = None                          # a fixed kernel (the router: fp32)
    kinds: dict[int, str] = field(default_factory=dict)                  # rows -> kernel
    weights: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)
    packs: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)   # (kind, rows or 0) -> pack
    shape: tuple[int, int] | None = None


def folding_pays(attn) -> bool:
    return attn.kv_rank + attn.rope_dim <= 2 * (attn.nope + attn.rope_dim)


class DecodeWeights:
    def __init__(self, model: Transformer, device: torch.device, kinds: list[str],
                 dense_moe_max_bytes: int = 256 << 20, in_place: bool = False):
        """in_place: `sync()` writes new values into the derived tensors it made before (same shapes)
        rather than making new ones, so their addresses stay fixed (CUDA graphs read them there)."""
        self.model, self.device, self.kinds, self.in_place = model, device, kinds, in_place
        self.moe_copy_max_bytes = dense_moe_max_bytes     # per layer: fused dense weights, or grouped packs
        self.gemms: dict[str, Gemm] = {}
        # MoE layer, dtype (or "panel": the grouped path's packs) -> the expert stacks (w13, w2)
        self.stacks: dict[tuple[int, torch.dtype | str], tuple] = {}
        L = len(model.layers)
        # the main blocks, then the MTP blocks (indices L.., their cache layers): the speculative step
        # runs both
        self.blocks = list(enumerate(model.layers)) + [(L + k, m.block) for k, m in enumerate(model.mtp)]
        self.folded = {i: folding_pays(layer.attn) for i, layer in self.blocks}
        self._key = None
        self._tensors: dict[tuple, dict] = {}
        self._owned: dict[int, torch.Tensor] = {}    # in_place: the derived tensors made here, by id
        # weight-only fp8 keeps the output head and the MTP projection in bf16 (as DeepSeek's FP8 release does)
        high = "bf16" if "fp8" in kinds else None
        for k, m in enumerate(model.mtp):
            self._add(f"mtp{k}.eh", lambda m=m: m.eh_proj.weight.float(), only=high)
        for i, layer in self.blocks:
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
                    self._add(f"moe{i}.shared_in", lambda m=ffn: m.shared.w13.weight.float())
                    self._add(f"moe{i}.shared_out", lambda m=ffn: m.shared.w2.weight.float())
                if (E * F2 * D * 2) * 4 <= dense_moe_max_bytes:
                    self._add(f"moe{i}.dense_in", lambda m=ffn: _dense_in(m))
                    self._add(f"moe{i}.dense_out", lambda m=ffn: _dense_out(m))
            elif isinstance(ffn, MLP):
                self._add(f"mlp{i}.w13", lambda m=ffn: m.w13.weight.float())
                self._add(f"mlp{i}.w2", lambda m=ffn: m.w2.weight.float())
        self._add("head", lambda: model.head.weight.float(), only=high)
        self._params = [(m._parameters, n) for m in model.modules() for n, p in m._parameters.items()
                        if p is not None]

    def _add(self, name: str, source, only: str | None = None) -> None:
        self.gemms[name] = Gemm(name, source, only)

    def grouped_fits(self, i: int) -> bool:
        """May MoE layer i take the grouped path? Its packs are an fp32 copy of the layer's experts (and
        measuring it makes one more): small layers only, like the fused dense weights (a V3 layer's
        experts are ~45 GB in fp32)."""
        E, F2, D = dict(self.blocks)[i].ffn.experts.w13.shape
        return E * F2 * D * 3 // 2 * 4 <= self.moe_copy_max_bytes

    def has_dense(self, i: int) -> bool:
        """Does MoE layer i have the fused dense path's weights (small enough layers do)?"""
        return f"moe{i}.dense_in" in self.gemms

    # ---------------------------------------------------------------------------------------------
    def plan(self, rows: int, mtp: bool = False, dense: frozenset[int] = frozenset()) -> dict[str, str]:
        """Choose (by measurement, cached per host) how a step of `rows` rows runs, and make the copies
        and packs that needs: {GEMM name: kernel, "moe{i}.path": gather/dense/capacity,
        "moe{i}.experts": the kernel of the expert stacks' batched matmuls}. `dense`: MoE layers that
        take the fused dense path (where it exists) whatever the row count (the runner's choice for
        a router too unbalanced for the capacity path).

        Each GEMM takes the fastest kernel at this row count; the batched expert matmuls take the
        faster plain dtype for a GEMM of the same work (one row for gather's per-pair products, E x
        capacity rows for the capacity path). So in mixed precision a request's tokens can depend on
        the batch it shares (as in other engines); with one dtype (--dtype float32) they do not,
        beyond fp32 rounding. `mtp`: also the MTP blocks (the speculative step)."""
        plan, used, measured = {}, ["head"], []
        plain = [k for k in self.kinds if k not in gemm.PACKED]
        blocks = self.blocks if mtp else self.blocks[: len(self.model.layers)]
        if mtp:
            used += [f"mtp{k}.eh" for k in range(len(self.model.mtp))]
        for i, layer in blocks:
            if self.folded[i]:
                used += [f"attn{i}.down", f"attn{i}.q", f"attn{i}.out"]
            if isinstance(layer.ffn, MLP):
                used += [f"mlp{i}.w13", f"mlp{i}.w2"]
            if not isinstance(layer.ffn, MoE):
                continue
            moe = layer.ffn
            grouped = "panel" in self.kinds and self.grouped_fits(i) and \
                grouped_pays(moe, i, rows, self.has_dense(i), self.kinds, measured)
            path = choose_path(moe, rows, self.has_dense(i), grouped)
            if i in dense and self.has_dense(i):
                path = "dense"
            plan[f"moe{i}.path"] = path
            used.append(f"moe{i}.router")
            if path == "dense":
                used += [f"moe{i}.dense_in", f"moe{i}.dense_out"]
                continue
            used += [f"moe{i}.shared_in", f"moe{i}.shared_out"] if moe.shared is not None else []
            if path == "grouped":                       # the expert stacks in panels (`gemm.pack` of each stack)
                plan[f"moe{i}.experts"] = "panel"
                self.stacks.setdefault((i, "panel"), None)
                continue
            E, F2, D = moe.experts.w13.shape
            proxy = 1 if path == "gather" else E * capacity(moe, rows, self.device.type)
            kind = gemm.fastest(self.device, proxy, D, F2, plain, measured)
            plan[f"moe{i}.experts"] = kind
            self.stacks.setdefault((i, gemm.storage(kind)), None)       # built by sync()
        for name in used:
            g = self.gemms[name]
            if rows not in g.kinds:
                if g.shape is None:
                    g.shape = tuple(g.source().shape)
                N, K = g.shape
                g.kinds[rows] = g.only or gemm.fastest(self.device, rows, K, N, self.kinds, measured)
            plan[name] = g.kinds[rows]
        if measured:
            counts = {k: sum(1 for n in used if plan[n] == k) for k in dict.fromkeys(plan[n] for n in used)}
            calibrate.announce(f"decode GEMM kernels for {rows}-row steps: " +
                               ", ".join(f"{c} {k}" for k, c in counts.items()) +
                               f" ({len(measured)} shapes timed)")
        self.sync(only_missing=True)
        return plan

    def tensors(self, rows: int, plan: dict[str, str]) -> dict[str, torch.Tensor]:
        """The step's inputs for a planned row count: each GEMM's weight in its kernel's dtype and its
        pack, and the expert stacks (built once per sync)."""
        # a decode plan or a speculative one (with the MTP block), and the layers on the dense path
        key = (rows, "mtp0.eh" in plan, *layers_on(plan, "dense"))
        hit = self._tensors.get(key)
        if hit is not None:
            return hit
        out = self._tensors[key] = {}
        for name, kind in plan.items():
            if name.endswith((".path", ".capacity")):
                continue
            if name.endswith(".experts"):
                i = int(name[3:-len(".experts")])
                stack = self.stacks[(i, "panel" if kind == "panel" else gemm.storage(kind))]
                for proj, derived in zip(("w13", "w2"), stack):
                    out[f"moe{i}.{proj}"] = derived[0]
                    if len(derived) == 2:                              # fp8: and its block scales
                        out[f"moe{i}.{proj}.scale"] = derived[1]
                continue
            g = self.gemms[name]
            out[name] = g.weights[gemm.storage(kind)]
            pk = g.packs.get(_pack_key(kind, rows))
            if pk is not None:
                out[name + ".pack"] = pk
        if self.in_place:     # CUDA graphs read these where they are instead of copying them in per replay
            for t in out.values():
                if getattr(t, "_dynamo_static_input_type", None) is None:
                    torch._dynamo.mark_static_address(t, guard=False)
        return out

    def derived_bytes(self) -> int:
        """Memory held by the derived weights beyond the model's own tensors (copies, packs, stacks)."""
        own = {t.data_ptr() for t in list(self.model.parameters()) + list(self.model.buffers())}
        seen, total = set(), 0
        tensors = [t for g in self.gemms.values() for t in (*g.weights.values(), *g.packs.values())]
        tensors += [t for stack in self.stacks.values() if stack is not None for derived in stack for t in derived]
        for t in tensors:
            if t.is_mkldnn:                       # oneDNN packs have no data_ptr; count their elements
                total += t.numel() * t.element_size()
            elif t.data_ptr() not in own and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def stale(self) -> bool:
        """Has any parameter changed since the last sync (in place, `.data` swapped, or replaced)?"""
        key = self._key
        return key is None or not all(d[name] is p and p._version == v and p.data_ptr() == ptr
                                      for (d, name), (p, v, ptr) in zip(self._params, key))

    def _version(self):
        return [(p, p._version, p.data_ptr()) for d, name in self._params for p in (d[name],)]

    @torch.no_grad()
    def sync(self, only_missing: bool = False) -> None:
        """Recompute every derived tensor from the model's parameters, or with `only_missing` (and
        unchanged parameters) just create what a new plan needs."""
        full = not only_missing or self.stale()
        key = self._version()
        self._tensors = {}
        own = {p.untyped_storage().data_ptr() for p in list(self.model.parameters()) + list(self.model.buffers())}

        def keep(old, new):
            """new, or (in_place) its values written into `old`, a tensor this object made earlier (never
            into a tensor it only borrowed: a parameter, or a view of one, that the model may since
            have replaced). Returns what the derived weights hold from now on."""
            if not self.in_place:
                return new
            if old is not None and old is not new and self._owned.get(id(old)) is old and \
                    old.shape == new.shape and old.dtype == new.dtype:
                return old.copy_(new)
            if old is not None:
                self._owned.pop(id(old), None)
            if not new.is_mkldnn and new.untyped_storage().data_ptr() not in own:
                self._owned[id(new)] = new
            return new

        with torch.autocast(self.device.type, enabled=False):
            for g in self.gemms.values():
                dtypes = {gemm.storage(k) for k in g.kinds.values()}
                if not full and dtypes <= set(g.weights) and \
                        all(_pack_key(k, r) in g.packs for r, k in g.kinds.items() if k in gemm.PACKED):
                    continue
                if not dtypes:
                    continue
                w32 = g.source().to(self.device)
                for dt in dtypes:
                    w, *scale = _derive(w32, dt)
                    g.weights[dt] = keep(g.weights.get(dt), w)
                    if scale:                                      # fp8: the block scales are its "pack"
                        g.packs[("fp8", 0)] = scale[0]
                # one pack per key: per row count for MKL, one for all row counts for oneDNN (made for the
                # largest, a hint that measured ~15% better than packing for 1 row at 8 rows)
                hints: dict[tuple[str, int], int] = {}
                for rows, kind in g.kinds.items():
                    if kind in gemm.PACKED:
                        pk = _pack_key(kind, rows)
                        hints[pk] = max(hints.get(pk, 1), rows)
                for (kind, key_rows), rows in hints.items():
                    g.packs[(kind, key_rows)] = gemm.pack(g.weights[gemm.DTYPE[kind]], kind, rows)
            blocks = dict(self.blocks)
            for (i, dt), old in self.stacks.items():
                if full or old is None:
                    ex = blocks[i].ffn.experts
                    if dt == "panel":                      # the grouped path's packs
                        new = tuple((gemm.pack(w.detach().float(), "panel", 0),) for w in (ex.w13, ex.w2))
                    else:
                        new = (_derive(ex.w13.detach(), dt), _derive(ex.w2.detach(), dt))
                    self.stacks[(i, dt)] = new if old is None else tuple(
                        tuple(keep(o, n) for o, n in zip(od, nd)) for od, nd in zip(old, new))
        self._key = key


def _pack_key(kind: str, rows: int) -> tuple[str, int]:
    return (kind, rows if kind == "mkl" else 0)    # MKL packs are made for one row count


def _derive(src: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A weight in its storage dtype: (tensor,), or for e4m3 (tensor, its 128x128 block scales)."""
    if dtype == torch.float8_e4m3fn:
        q = quantize(src, WEIGHT)
        return q.q, q.scale
    return (_cast(src, dtype),)


def _cast(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """src in `dtype`: the parameter itself where it already is (live, no copy), else a copy. On CPU
    derived tensors are assigned afresh at every sync (the step receives them as inputs on every call,
    so nothing holds on to the old ones); for CUDA graphs `sync` writes into them (`in_place`)."""
    return src if src.dtype == dtype and src.is_contiguous() else src.to(dtype).contiguous()


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
