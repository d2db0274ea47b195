"""llama.cpp as an optional decode contender: convert an HF DeepSeek-V3 directory with llama.cpp's own
`convert_hf_to_gguf.py` and time `llama-batched-bench` on it (the engine behind ollama; it runs this
architecture as `deepseek2`, MLA over the latent cache).

Give the path of a llama.cpp checkout with a build of `llama-batched-bench` (`--llama-cpp DIR` or
$LLAMA_CPP_DIR). One way to get one without git: the `llama-cpp-python` sdist vendors llama.cpp:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    cd llama_cpp_python-0.3.36/vendor/llama.cpp && cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \\
        && cmake --build build -j2 --target llama-batched-bench          # ~10 min on 2 cores

Two things the converter needs that a random benchmark model lacks: `scoring_func: "sigmoid"` and
`topk_method: "noaux_tc"` in config.json (without them it silently converts softmax gating), and a
tokenizer whose pre-tokenizer it recognises by hash. The benchmark never tokenizes text (batched-bench
feeds random token ids), so a nanoseek BPE tokenizer is saved with the model and the converter is told
it is "gpt-2".
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def find(path: str | None) -> Path | None:
    path = path or os.environ.get("LLAMA_CPP_DIR")
    if not path:
        return None
    root = Path(path)
    if not (root / "convert_hf_to_gguf.py").exists() or not bench_binary(root):
        raise SystemExit(f"--llama-cpp {root}: expected a llama.cpp checkout with convert_hf_to_gguf.py and "
                         "build/bin/llama-batched-bench (see benchmarks/llama_cpp_bench.py)")
    return root


def bench_binary(root: Path) -> Path | None:
    for p in (root / "build" / "bin" / "llama-batched-bench", root / "llama-batched-bench"):
        if p.exists():
            return p
    return None


CONVERT = """
import sys
sys.argv = sys.argv[1:]
sys.path.insert(0, {root!r})
import convert_hf_to_gguf as c
from conversion.base import TextModel
TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"   # random token ids only: any BPE pre-tokenizer
c.main()
"""


def convert(root: Path, model_dir: str, vocab_size: int, outtype: str, work: Path) -> Path:
    """model_dir (HF, no tokenizer) -> a GGUF file of `outtype` (f32 | bf16)."""
    from nanoseek.tokenizer import Tokenizer

    src = work / "hf"
    if not src.exists():
        shutil.copytree(model_dir, src)
        cfg = json.loads((src / "config.json").read_text())
        cfg.update(scoring_func="sigmoid", topk_method="noaux_tc")
        (src / "config.json").write_text(json.dumps(cfg, indent=2))
        words = ["the", "model", "expert", "latent", "attention", "token", "cache", "route", "decode", "batch"]
        texts = [" ".join(words[(i * 7 + j * 3) % 10] + words[(i + j) % 10] for j in range(12)) for i in range(400)]
        Tokenizer.train(texts, vocab_size=min(vocab_size, 1024)).save(src)     # BPE with merges
    out = work / f"model-{outtype}.gguf"
    script = work / "convert.py"
    script.write_text(CONVERT.format(root=str(root)))
    subprocess.run([sys.executable, str(script), "x", str(src), "--outfile", str(out), "--outtype", outtype],
                   check=True, capture_output=True, text=True)
    return out


def run(root: Path, model_dir: str, vocab_size: int, batches: list[int], prompt: int, new: int,
        threads: int = 2, dtypes=("f32", "bf16")) -> dict:
    """{dtype: {batch: {"gen_tok_s": B*new / (prompt + generation time), "tg_tok_s": generation only}}}."""
    binary = bench_binary(root)
    work = Path(tempfile.mkdtemp(prefix="nanoseek-llamacpp-"))
    res = {}
    for dt in dtypes:
        gguf = convert(root, model_dir, vocab_size, dt, work)
        ctx = max(batches) * (prompt + new) + 64
        cmd = [str(binary), "-m", str(gguf), "-c", str(ctx), "-b", "2048", "-ub", "512", "-t", str(threads),
               "-npp", str(prompt), "-ntg", str(new), "-npl", ",".join(map(str, batches)),
               "--output-format", "jsonl"]
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"llama-batched-bench failed: {p.stderr[-2000:]}")
        rows = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
        res[dt] = {r["pl"]: {"gen_tok_s": round(r["pl"] * r["tg"] / (r["t_pp"] + r["t_tg"]), 1),
                             "tg_tok_s": round(r["speed_tg"], 1)} for r in rows}
    shutil.rmtree(work, ignore_errors=True)
    return res
