"""Activation checkpointing (nanoseek/train/recompute.py) against the plain training step."""
import copy
import json

import pytest
import torch

from conftest import randomize, random_cfg
from nanoseek.model import Transformer
from nanoseek.model.moe import RoutingRecord
from nanoseek.train.pretrain import PretrainConfig, pretrain
from nanoseek.train.recompute import checkpoint_blocks, saved_activation_bytes


def test_same_loss_and_gradients_with_a_fraction_of_the_saved_activations():
    torch.manual_seed(0)
    plain = randomize(Transformer(random_cfg(num_hidden_layers=3))).train()
    ckpt = copy.deepcopy(plain)
    assert checkpoint_blocks(ckpt) == len(ckpt.layers) + len(ckpt.mtp)
    assert checkpoint_blocks(ckpt) == 0                       # wrapping twice is a no-op
    ids = torch.randint(0, plain.cfg.vocab_size, (4, 48))
    out = {}
    for name, m in (("plain", plain), ("ckpt", ckpt)):
        def step():
            out[name] = m.logits(m.hidden(ids, routing=RoutingRecord())).float().logsumexp(-1).mean()
        out[name + "_bytes"] = saved_activation_bytes(step)
        out[name].backward()
    assert torch.equal(out["plain"], out["ckpt"])
    for (n, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        assert (a.grad is None) == (b.grad is None), n
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    assert out["ckpt_bytes"] < 0.3 * out["plain_bytes"], (out["ckpt_bytes"], out["plain_bytes"])
    with torch.no_grad():                                     # inference is not checkpointed
        assert torch.equal(plain(ids), ckpt(ids))


def test_pretrain_recompute_matches_plain_and_refuses_parallel(tmp_path):
    base = dict(preset="tiny", max_steps=6, batch_size=4, seq_len=64, n_docs=400, compile="off", eval_every=0)
    a = pretrain(PretrainConfig(out=str(tmp_path / "a"), **base))
    b = pretrain(PretrainConfig(out=str(tmp_path / "b"), recompute=True, **base))
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert len(la) == 6 and max(abs(x - y) for x, y in zip(la, lb)) < 1e-4 * max(la)
    assert abs(a["final_loss"] - b["final_loss"]) < 1e-4 * a["final_loss"]


def test_compiled_blocks_take_the_padded_experts():
    """torch.compile's meta kernel of _grouped_mm (torch 2.13) accepts bf16 only: compiled blocks run the
    experts padded (an fp32 `pretrain --compile on` failed to trace before)."""
    from nanoseek.train.compiled import StepCompiler
    model = Transformer(random_cfg())
    StepCompiler(model, "on")
    assert {m.impl for m in model.moe_layers()} == {"padded"}


@pytest.mark.slow
def test_pretrain_compiled_fp32_with_recompute(tmp_path):
    s = pretrain(PretrainConfig(out=str(tmp_path), preset="tiny", max_steps=4, batch_size=4, seq_len=64, n_docs=400,
                                compile="on", recompute=True, dtype="float32", eval_every=0))
    assert s["final_loss"] < s["first_loss"]


def test_a_copy_recomputes_with_its_own_weights_and_replay_is_refused():
    torch.manual_seed(0)
    model = randomize(Transformer(random_cfg()))
    checkpoint_blocks(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    plain = copy.deepcopy(twin)
    for block in list(plain.layers) + [m.block for m in plain.mtp]:
        del block.forward                                     # back to the class's forward
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    torch.testing.assert_close(twin.logits(twin.hidden(ids)), plain.logits(plain.hidden(ids)))
    replay = [torch.zeros(24, model.cfg.num_experts_per_tok, dtype=torch.long)] * len(model.moe_layers())
    with pytest.raises(ValueError, match="routing replay"):
        model.hidden(ids, routing=RoutingRecord(replay))
