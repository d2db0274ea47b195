import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import randomize, random_cfg
import nanoseek
from nanoseek.checkpoint.hf import CheckpointError, dequant_fp8_blocks
from nanoseek.model import Transformer


@pytest.fixture
def saved(tmp_path):
    nanoseek.save_pretrained(randomize(Transformer(random_cfg())), tmp_path)
    return tmp_path


def test_missing_tensor_is_named(saved):
    sd = load_file(saved / "model.safetensors")
    del sd["model.layers.1.self_attn.kv_b_proj.weight"]
    save_file(sd, str(saved / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        nanoseek.from_pretrained(saved)


def test_wrong_shape_is_named(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["kv_lora_rank"] = 12
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"kv_a_proj_with_mqa.*shape"):
        nanoseek.from_pretrained(saved)


def test_truncated_file(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        nanoseek.from_pretrained(saved)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        nanoseek.from_pretrained(tmp_path / "nope")


def test_fp8_block_dequant():
    w = torch.randn(200, 300)
    s = torch.rand(2, 3) + 0.5
    q = (w / s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]).clamp(-448, 448)
    q8 = q.to(torch.float8_e4m3fn)
    back = dequant_fp8_blocks(q8, s)
    assert (back - w).abs().max() / w.abs().max() < 0.07   # e4m3 keeps ~3 mantissa bits
