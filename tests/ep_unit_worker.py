"""Run under torchrun by tests/test_distributed.py: one MoE layer under expert parallelism against the
same layer in one process, forward and backward, with a router biased so that one rank receives no
tokens at all (the empty all-to-all split)."""
import copy
import sys

import torch
import torch.distributed as dist

from nanoseek.config import load_preset
from nanoseek.distributed.expert_parallel import apply_expert_parallel
from nanoseek.model.moe import MoE

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
cfg = load_preset("tiny").replace(n_group=1, topk_group=1)
torch.manual_seed(0)
ref = MoE(cfg)
for p in ref.parameters():
    torch.nn.init.normal_(p, std=0.1)
ref.gate.bias.copy_(torch.tensor([5.0] * 4 + [-5.0] * 4))       # every token picks experts 0-3 (rank 0's)
x = torch.randn(2 * world, 5, cfg.hidden_size)
local_x = x[rank * 2:(rank + 1) * 2].clone().requires_grad_()
full_x = x.clone().requires_grad_()

ep = copy.deepcopy(ref)
ref_out = ref(full_x)
ref_out.square().sum().backward()

apply_expert_parallel(ep, dist.group.WORLD, world, rank)
out = ep(local_x)
out.square().sum().backward()

ok = torch.allclose(out, ref_out[rank * 2:(rank + 1) * 2], atol=1e-6)
ok &= torch.allclose(local_x.grad, full_x.grad[rank * 2:(rank + 1) * 2], atol=1e-6)
El = cfg.n_routed_experts // world
w13_grad = ep.experts.w13.grad
ok &= w13_grad is not None
if w13_grad is not None:
    # the expert gradient of one process restricted to this rank's experts; the EP gradient sums over
    # the tokens of every rank, as one process does over the whole batch
    ok &= torch.allclose(w13_grad, ref.experts.w13.grad[rank * El:(rank + 1) * El], atol=1e-5)
    if rank == world - 1:
        ok &= bool((w13_grad == 0).all())        # received nothing: zero gradient, not a missing one
print(f"rank {rank} ok={bool(ok)}", flush=True)
sys.exit(0 if ok else 1)
