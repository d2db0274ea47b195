"""GRPO pieces pinned on hand-computed numbers, and rollout log-probs == trainer log-probs."""
import math

import pytest
import torch

from conftest import randomize, random_cfg
from nanoseek.model import Transformer
from nanoseek.train.grpo import build_batch, policy_logprobs
from nanoseek.train.grpo_loss import group_advantages, grpo_loss, k3_kl


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    # groups of 2: mean 0.5, unbiased std sqrt(0.5) = 0.70711; the last group has zero variance
    a = group_advantages(r, 2, "group")
    assert torch.allclose(a, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0]) / (0.5 ** 0.5 + 1e-4), atol=1e-6)
    assert torch.allclose(group_advantages(r, 2, "none"), torch.tensor([0.5, -0.5, -0.5, 0.5, 0.0, 0.0]))
    g3 = group_advantages(torch.tensor([3.0, 0.0, 0.0]), 3, "group")
    # mean 1, std = sqrt(((2)^2 + 1 + 1) / 2) = sqrt(3)
    assert torch.allclose(g3, torch.tensor([2.0, -1.0, -1.0]) / (3 ** 0.5 + 1e-4), atol=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(5), 2)


def _batch():
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    logp = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.5, 0.5, 0.5]]))
    return logp, mask


@pytest.mark.parametrize("loss_type, expected", [
    ("grpo", (-1.0 + 0.5) / 2),          # per-sequence token means (-1, +0.5), averaged over sequences
    ("dapo", (-2.0 + 1.5) / 5),          # token-level: sum over 5 tokens / 5
    ("dr_grpo", (-2.0 + 1.5) / (2 * 4)),  # sum / (N * max_len) with max_len 4
])
def test_loss_aggregation_by_hand(loss_type, expected):
    logp, mask = _batch()
    adv = torch.tensor([1.0, -0.5])
    loss, stats = grpo_loss(logp, logp.detach(), adv, mask, loss_type=loss_type, max_len=4)
    assert loss.item() == pytest.approx(expected, abs=1e-7)
    assert stats["clip_frac"] == 0.0


def test_clipping_by_hand():
    mask = torch.ones(2, 1)
    old = torch.log(torch.tensor([[0.4], [0.4]]))
    new = torch.log(torch.tensor([[0.6], [0.6]]))            # ratio 1.5
    loss, stats = grpo_loss(new, old, torch.tensor([1.0, -1.0]), mask, eps_low=0.2, eps_high=0.28, loss_type="dapo")
    # A>0: min(1.5, 1.28) * 1 = 1.28 (clipped);  A<0: min(-1.5, -1.28) = -1.5 (not clipped)
    assert loss.item() == pytest.approx(-(1.28 - 1.5) / 2, abs=1e-6)
    assert stats["clip_high"] == pytest.approx(0.5) and stats["clip_low"] == 0.0


def test_k3_kl_by_hand():
    kl = k3_kl(torch.log(torch.tensor(0.5)), torch.log(torch.tensor(0.25)))
    assert kl.item() == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)
    logp, mask = _batch()
    loss, stats = grpo_loss(logp, logp.detach(), torch.zeros(2), mask, beta=0.1, ref_logp=logp + 0.1, loss_type="dapo")
    per_tok = math.exp(0.1) - 0.1 - 1
    assert stats["kl"] == pytest.approx(per_tok, rel=1e-5)
    assert loss.item() == pytest.approx(0.1 * per_tok, rel=1e-5)


def test_gradient_is_reinforce_with_baseline():
    """mu=1: ratio == 1, so d loss / d logp_t = -A / n_tokens (dapo)."""
    logp, mask = _batch()
    logp = logp.clone().requires_grad_()
    adv = torch.tensor([2.0, -1.0])
    loss, _ = grpo_loss(logp, logp.detach(), adv, mask, loss_type="dapo")
    loss.backward()
    expect = -(adv[:, None] * mask) / mask.sum()
    assert torch.allclose(logp.grad, expect)


def test_engine_logprobs_equal_trainer_logprobs():
    from nanoseek.inference.engine import Engine
    from nanoseek.inference.sampling import SamplingParams

    torch.manual_seed(0)
    model = randomize(Transformer(random_cfg(rope_factor=1.0, max_position_embeddings=128))).eval()
    eng = Engine(model, max_batch=16, max_len=96, seed=3)
    prompts = [[1, 5, 7, 9], [1, 3, 3, 8, 2, 4]]
    temperature = 0.7
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(n=3, temperature=temperature, max_tokens=12, ignore_eos=True), str(i))
    seqs = []
    while eng.has_work():
        seqs += [s for s in eng.step() if s.finish_reason]
    comps = [{"ids": s.out_ids, "truncated": False, "logprobs": s.logprobs} for s in seqs]
    ids, mask, _, engine = build_batch([s.prompt_ids for s in seqs], comps, torch.zeros(len(seqs)), 0, False, "cpu")
    with torch.no_grad():
        trainer = policy_logprobs(model, ids, mask, temperature)
    assert int(mask.sum()) == sum(len(s.logprobs) for s in seqs)
    assert (trainer - engine).abs().max() < 1e-5          # build_batch lays the engine's log-probs out as the trainer's


def test_routing_replay_makes_trainer_match_the_engine_where_only_routing_differs():
    """The engine records every input position's experts; replaying them in the trainer's forward gives the
    engine's log-probs back after the routing alone changed (a new selection bias moves the top-k choice and
    not the weights), while the unreplayed forward differs. The router still gets a gradient."""
    from nanoseek.inference.engine import Engine
    from nanoseek.inference.sampling import SamplingParams
    from nanoseek.model.moe import MoE
    from nanoseek.train.grpo import build_replay

    torch.manual_seed(0)
    model = randomize(Transformer(random_cfg(rope_factor=1.0, max_position_embeddings=128))).eval()
    eng = Engine(model, max_batch=16, max_len=96, seed=3, autocast_dtype=torch.float32, record_routing=True)
    prompts = [[1, 5, 7, 9], [1, 3, 3, 8, 2, 4]]
    for i, p in enumerate(prompts):
        eng.add_request(p, SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True), str(i))
    seqs = []
    while eng.has_work():
        seqs += [s for s in eng.step() if s.finish_reason]
    comps = [{"ids": s.out_ids, "truncated": False, "logprobs": s.logprobs,
              "routing": torch.cat(s.routing, dim=1)} for s in seqs]
    n_moe = sum(isinstance(layer.ffn, MoE) for layer in model.layers)
    assert n_moe and all(c["routing"].shape[:2] == (n_moe, len(s.prompt_ids) + len(s.out_ids) - 1)
                         for c, s in zip(comps, seqs))
    ids, mask, _, engine = build_batch([s.prompt_ids for s in seqs], comps, torch.zeros(len(seqs)), 0, False, "cpu")
    replay = build_replay([s.prompt_ids for s in seqs], comps, ids.shape[1], "cpu")
    with torch.no_grad():
        same = policy_logprobs(model, ids, mask, 1.0)
        assert (same - engine).abs().max() < 1e-5                    # fp32: the recorded routes are the model's
        for layer in model.layers:                                   # only the routing changes
            if isinstance(layer.ffn, MoE):
                layer.ffn.gate.bias.copy_(torch.randn_like(layer.ffn.gate.bias) * 5)
        moved = policy_logprobs(model, ids, mask, 1.0)
        recs = []
        replayed = policy_logprobs(model, ids, mask, 1.0, replay=replay, records=recs)
    assert recs[0].replayed_rows == n_moe * ids.shape[0] * (ids.shape[1] - 1) - int((replay[..., 0] < 0).sum())
    assert 0 < recs[0].changed_rows <= recs[0].replayed_rows       # the new bias moved the routes
    assert (moved - engine).abs().max() > 1e-2
    assert (replayed - engine).abs().max() < 1e-5
    model.zero_grad()
    (policy_logprobs(model, ids, mask, 1.0, replay=replay) * mask).sum().backward()
    gate = next(layer.ffn.gate.weight for layer in model.layers if isinstance(layer.ffn, MoE))
    assert gate.grad is not None and gate.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# the update: minibatches, accumulation, off-policy ratios

class _Policy:
    def __init__(self, model):
        self.model = model

    def sync_weights(self):
        pass


class _RecordingOpt:
    """Records each step's gradients instead of stepping (to compare accumulation with one big batch)."""

    def __init__(self, model):
        self.params, self.steps = list(model.parameters()), []

    def step(self):
        self.steps.append([p.grad.clone() if p.grad is not None else None for p in self.params])

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


def _update_batch(seed=0, n=5, length=12):
    model = randomize(Transformer(random_cfg(vocab_size=50, num_hidden_layers=2)).eval(), seed=seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, length), generator=g)
    mask = torch.zeros(n, length - 1)
    for i in range(n):                       # completions of different lengths after a 3-token prompt
        mask[i, 2: 2 + 3 + 2 * i] = 1.0
    adv = torch.randn(n, generator=g)
    return model, ids, mask, adv


def _cfg(**kw):
    from nanoseek.train.grpo import GRPOConfig
    base = dict(max_new_tokens=16, temperature=1.0, eps_low=0.2, eps_high=0.28, beta=0.0, loss_type="dapo",
                mu=1, minibatches=1, grad_accum=1, grad_clip=0.0)
    base.update(kw)
    return GRPOConfig(**base)


def test_update_plan_splits_evenly():
    from nanoseek.train.grpo import update_plan
    plan = update_plan(5, 2, 1)
    assert [[mb.tolist() for mb in step] for step in plan] == [[[0, 1, 2]], [[3, 4]]]
    plan = update_plan(5, 3, 2)
    assert [[mb.tolist() for mb in step] for step in plan] == [[[0, 1], [2, 3]], [[4]]]
    assert len(update_plan(2, 8, 1)) == 2                  # never an empty minibatch


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_accumulated_uneven_minibatches_equal_one_batch(loss_type):
    """3 uneven minibatches (2, 2, 1 rows; different token counts) accumulated into one step give the
    gradient of the whole batch: each is normalised by the step's counts, not by a third."""
    from nanoseek.train.grpo import train_on_batch
    model, ids, mask, adv = _update_batch()
    grads = []
    for mbs in (1, 3):
        opt = _RecordingOpt(model)
        st = train_on_batch(_Policy(model), None, opt, ids, mask, adv,
                            _cfg(minibatches=mbs, grad_accum=mbs, loss_type=loss_type), torch.device("cpu"),
                            torch.float32)
        assert len(opt.steps) == 1 and st["optimizer_steps"] == 1
        assert st["ratio_min"] == st["ratio_max"] == 1.0           # one step: on-policy
        grads.append(opt.steps[0])
    for a, b in zip(*grads):
        if a is not None:
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


def test_minibatches_after_a_step_see_the_true_ratio():
    """Two optimizer steps per rollout batch with mu=1: the second minibatch is off-policy. The old
    log-probs come from before the first step, so its ratio moves away from 1 (and clipping can act);
    with one step per batch the ratio is exactly 1."""
    from nanoseek.train.grpo import train_on_batch
    from nanoseek.train.optim import build_optimizer
    model, ids, mask, adv = _update_batch()
    opt = build_optimizer(model, 0.05, 0.0)
    st = train_on_batch(_Policy(model), None, opt, ids, mask, adv, _cfg(minibatches=2), torch.device("cpu"),
                        torch.float32)
    assert st["optimizer_steps"] == 2
    assert st["ratio_max"] > 1.01 or st["ratio_min"] < 0.99, st
    model, ids, mask, adv = _update_batch()
    st = train_on_batch(_Policy(model), None, build_optimizer(model, 0.05, 0.0), ids, mask, adv,
                        _cfg(minibatches=2, grad_accum=2), torch.device("cpu"), torch.float32)
    assert st["optimizer_steps"] == 1 and st["ratio_min"] == st["ratio_max"] == 1.0


def test_negative_advantage_below_the_clip_has_zero_gradient():
    """A < 0 and ratio < 1 - eps_low: the clipped term is the minimum, constant in the policy -> no gradient."""
    logp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    old = torch.tensor([[math.log(1.0)]])                        # ratio 0.5 < 1 - 0.2
    loss, st = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), 0.2, 0.2, loss_type="dapo")
    loss.backward()
    assert logp.grad.item() == 0.0 and st["clip_low"] == 1.0
    logp = torch.tensor([[math.log(0.9)]], requires_grad=True)   # inside the clip range: gradient flows
    loss, _ = grpo_loss(logp, old, torch.tensor([-1.0]), torch.ones(1, 1), 0.2, 0.2, loss_type="dapo")
    loss.backward()
    assert logp.grad.item() == pytest.approx(0.9)                # d(-rho*A)/dlogp = rho


def test_hf_rollouts_sample_the_trained_distribution():
    """The model's generation_config (here top_k=1 and a repetition penalty, as a hub model may ship) must
    not narrow what GRPO samples: the trainer scores softmax(logits / T) with top-p only."""
    transformers = pytest.importorskip("transformers")
    from nanoseek.inference.sampling import SamplingParams
    from nanoseek.train.rollout import HFSampler
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.top_k = 1
    model.generation_config.repetition_penalty = 5.0

    class Tok:
        eos_id = pad_id = 39
    groups = HFSampler(model, Tok(), "cpu").rollout([[1, 2, 3]], SamplingParams(n=16, temperature=1.0, max_tokens=6))
    distinct = {tuple(c["ids"]) for c in groups[0]}
    assert len(distinct) > 4, distinct                   # top_k=1 would make all 16 identical


def test_failed_rewards_are_left_out_of_the_baseline():
    nan = float("nan")
    adv = group_advantages(torch.tensor([1.0, nan, 0.0, 0.0]), 4, "none")
    assert adv.tolist() == pytest.approx([2 / 3, 0.0, -1 / 3, -1 / 3])       # mean over the 3 scored
    adv = group_advantages(torch.tensor([1.0, nan, 0.0, 0.0]), 4, "group", eps=0.0)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv.tolist() == pytest.approx([2 / 3 / std, 0.0, -1 / 3 / std, -1 / 3 / std])
    assert group_advantages(torch.tensor([nan, nan]), 2).tolist() == [0.0, 0.0]
    same = group_advantages(torch.tensor([1.0, 0.0, 0.5, 0.25]), 4, "group")    # no NaN: as before
    r = torch.tensor([1.0, 0.0, 0.5, 0.25])
    assert torch.allclose(same, (r - r.mean()) / (r.std() + 1e-4))


def test_gspo_sequence_ratio_by_hand():
    """GSPO: one ratio per sequence, exp(mean of the token log-ratios), clipped as a whole."""
    logp = torch.tensor([[0.2, 0.0, 9.0]], requires_grad=True)         # third position is padding
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = grpo_loss(logp, old, torch.tensor([1.0]), mask, 0.2, 0.2, loss_type="dapo", level="sequence")
    r = math.exp(0.1)
    assert st["ratio_min"] == pytest.approx(r) and st["ratio_max"] == pytest.approx(r)
    assert loss.item() == pytest.approx(-r)                             # -(r*A) on 2 tokens / 2 tokens
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-r / 2, -r / 2, 0.0])   # loss = -r, dr/dlogp_t = r/|o|
    logp.grad = None
    loss, st = grpo_loss(logp, old, torch.tensor([1.0]), mask, 0.05, 0.05, loss_type="dapo", level="sequence")
    loss.backward()                                                     # r = 1.105 > 1 + 0.05, A > 0: clipped
    assert st["clip_high"] == 1.0 and logp.grad.abs().max() == 0


def test_rollout_importance_weights_truncate_and_mask():
    from nanoseek.train.grpo import rollout_weights
    old = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    rollout = torch.log(torch.tensor([[0.5, 0.3, 0.4]]))                 # w = 1, 3, 0.5
    w, over = rollout_weights(old, rollout, "truncate", 2.0)
    assert w[0].tolist() == pytest.approx([1.0, 2.0, 0.5]) and over.tolist() == [[False, True, False]]
    w, _ = rollout_weights(old, rollout, "mask", 2.0)
    assert w[0].tolist() == pytest.approx([1.0, 0.0, 0.5])
    # the weight scales each token's policy-gradient term
    logp = torch.zeros(1, 3, requires_grad=True)
    loss, _ = grpo_loss(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 3), loss_type="dapo", is_weight=w)
    loss.backward()
    assert logp.grad[0].tolist() == pytest.approx([-1 / 3, 0.0, -0.5 / 3])


def test_batched_hf_rollouts_equal_one_prompt_at_a_time():
    """Greedy: left-padded batched generation gives each prompt the tokens it gets alone."""
    transformers = pytest.importorskip("transformers")
    from nanoseek.inference.sampling import SamplingParams
    from nanoseek.train.rollout import HFSampler
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()

    class Tok:
        eos_id, pad_id = 39, 0
    sampler = HFSampler(model, Tok(), "cpu")
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    sp = SamplingParams(n=2, temperature=0.0, max_tokens=8)
    together = sampler.rollout(prompts, sp)
    alone = [sampler.rollout([p], sp)[0] for p in prompts]
    assert [[c["ids"] for c in g] for g in together] == [[c["ids"] for c in g] for g in alone]


def test_truncated_completions_carry_no_loss_when_masked():
    prompts = [[1, 2, 3], [1, 2]]
    comps = [{"ids": [5, 6, 7], "truncated": True, "logprobs": [-1.0, -2.0, -3.0]},
             {"ids": [8, 9], "truncated": False, "logprobs": [-0.5, -0.25]}]
    ids, mask, _, lp = build_batch(prompts, comps, torch.zeros(2), 0, True, "cpu", multiple=1)
    assert mask[0].sum() == 0 and mask[1].tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]
    assert ids[1, :4].tolist() == [1, 2, 8, 9] and lp[1, 1:3].tolist() == [-0.5, -0.25]
    _, mask, _, _ = build_batch(prompts, comps, torch.zeros(2), 0, False, "cpu", multiple=1)
    assert mask[0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]       # targets at positions 2..4 predict 5, 6, 7


def test_rollout_batches_are_rounded_up_only_where_shapes_must_recur():
    """bf16 on CPU JITs a GEMM per shape, so its update batches are 16-multiples wide; fp32 (and GPUs)
    compute no rounding padding."""
    from nanoseek.train.grpo import width_multiple
    prompts, comps = [[1, 2, 3], [1, 2]], [{"ids": [5] * 20, "truncated": False}, {"ids": [8], "truncated": False}]
    widths = {}
    for dtype in (torch.float32, torch.bfloat16):
        ids, mask, _, _ = build_batch(prompts, comps, torch.zeros(2), 0, False, "cpu", width_multiple("cpu", dtype))
        widths[dtype] = ids.shape[1] - 1
    assert widths == {torch.float32: 22, torch.bfloat16: 32}
    assert width_multiple("meta", torch.bfloat16) == 1
    # the unrounded batch trains exactly as the rounded one (the reference): padding after the last
    # target changes no log-prob of a causal model, so the gradient is the same
    from nanoseek.train.grpo import train_on_batch
    model = randomize(Transformer(random_cfg(vocab_size=50, num_hidden_layers=2)).eval(), seed=3)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 50, (n,), generator=g).tolist() for n in (3, 5, 2, 4)]
    comps = [{"ids": torch.randint(1, 50, (n,), generator=g).tolist(), "truncated": False} for n in (9, 2, 6, 4)]
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75])
    grads = []
    for multiple in (16, 1):
        ids, mask, a, _ = build_batch(prompts, comps, adv, 0, False, "cpu", multiple)
        opt = _RecordingOpt(model)
        st = train_on_batch(_Policy(model), None, opt, ids, mask, a, _cfg(), torch.device("cpu"), torch.float32)
        grads.append((ids.shape[1], st["loss"], opt.steps[0]))
    (w16, loss16, g16), (w1, loss1, g1) = grads
    assert (w16, w1) == (17, 12) and loss1 == pytest.approx(loss16, rel=1e-6)
    for x, y in zip(g16, g1):
        assert (x is None) == (y is None)
        if x is not None:
            assert torch.allclose(x, y, atol=1e-6, rtol=1e-5)


def test_carried_over_groups_use_their_samplers_logprobs_as_the_old_policy():
    """Groups carried from the previous step were sampled by the previous policy: their ratio is taken
    against the sampler's log-probs (here 0.5 nats below the current policy's), not forced to 1."""
    from nanoseek.train.grpo import train_on_batch
    model, ids, mask, adv = _update_batch()
    with torch.no_grad():
        now = policy_logprobs(model, ids, mask, 1.0)
    carried = torch.tensor([True, True, False, False, False])
    rollout = (now - 0.5 * carried.unsqueeze(1)) * mask                # the carried rows' sampler: 0.5 below
    st = train_on_batch(_Policy(model), None, _RecordingOpt(model), ids, mask, adv, _cfg(eps_high=10.0),
                        torch.device("cpu"), torch.float32, rollout, carried)
    assert st["ratio_max"] == pytest.approx(math.exp(0.5), rel=1e-4) and st["ratio_min"] == pytest.approx(1.0)
    assert st["rollout_logp_gap"] == pytest.approx(0.0, abs=1e-5)      # measured on the fresh rows only
