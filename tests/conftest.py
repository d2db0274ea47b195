import atexit
import os
import shutil
import tempfile

import pytest
import torch

import nanoseek

os.environ.setdefault("NANOSEEK_NO_PROGRESS", "1")
# the suite starts from an empty calibration cache, as on CI: one that earlier runs filled (measured
# compile times, kernel choices) changes what the suite compiles - with it, a default-settings engine
# test compiled for 39 s in a fresh clone whose inductor cache was cold. NANOSEEK_CACHE_DIR set: kept.
if "NANOSEEK_CACHE_DIR" not in os.environ:
    os.environ["NANOSEEK_CACHE_DIR"] = tempfile.mkdtemp(prefix="nanoseek-tests-")
    atexit.register(shutil.rmtree, os.environ["NANOSEEK_CACHE_DIR"], True)
# exact comparisons (HF parity, engine == full recompute) need one precision whatever this host's
# calibration would pick; tests of the measured choice unset it themselves
os.environ.setdefault("NANOSEEK_DTYPE", "float32")
torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    # keep unit tests deterministic regardless of test order
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg():
    from nanoseek.config import load_preset
    return load_preset("tiny")


def random_cfg(**kw):
    """A small random-shaped DeepSeek-V3 config with YaRN and group-limited routing."""
    from nanoseek.config import ModelConfig
    base = dict(vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
                num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=3, n_routed_experts=8,
                n_group=4, topk_group=2, num_experts_per_tok=3, q_lora_rank=20, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=6, v_head_dim=10, routed_scaling_factor=2.5,
                rope_factor=4.0, original_max_position_embeddings=16, max_position_embeddings=64,
                num_nextn_predict_layers=1, initializer_range=0.1)
    base.update(kw)
    return ModelConfig(**base)


def randomize(model, seed=0, bias_std=0.5):
    """Non-trivial weights everywhere: random norms and a non-zero router bias."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(model.cfg.initializer_range * torch.randn(p.shape, generator=g))
        for moe in model.moe_layers():
            if moe.gate.bias is not None:
                moe.gate.bias.copy_(bias_std * torch.randn(moe.gate.bias.shape, generator=g))
    return model


CHAT_TEXTS = ["Hello world, how are you today? I am fine, thank you. 12+34=46.",
              "The quick brown fox jumps over the lazy dog. <think>hmm</think> <answer>ok</answer>",
              "Héllo wörld: 世界 ünïcode text, naïve café."] * 40


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random DeepSeek-V3 saved in HF format with a 300-token BPE tokenizer (server and CLI tests)."""
    from nanoseek.config import load_preset
    from nanoseek.model import Transformer
    from nanoseek.tokenizer import Tokenizer
    tok = Tokenizer.train(CHAT_TEXTS, vocab_size=300)
    model = Transformer(load_preset("tiny", vocab_size=tok.vocab_size)).init_weights(0)
    path = tmp_path_factory.mktemp("tiny-model")
    nanoseek.save_pretrained(model, path, tokenizer=tok)
    return path


def nanoseek_cli(*args, stdin: str | None = None):
    """`nanoseek <args>` run in this process through the CLI's own entry (`nanoseek.cli.main`): its exit
    code, stdout and stderr, as a subprocess would show them, without a fresh interpreter importing torch
    (4-6 s a process on a 2-core host). An exception the CLI did not turn into a message propagates (a
    subprocess would have printed a traceback). The entry point itself runs as a real process in
    test_inference_cli.py and test_server.py."""
    import contextlib
    import io
    import sys
    from types import SimpleNamespace

    from nanoseek.cli import main
    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    if stdin is not None:
        sys.stdin = io.StringIO(stdin)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:          # argparse's usage errors; sys.exit("message") prints it, exits 1
                if e.code is not None and not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.stdin = old_stdin
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())
