"""Which grammar library for structured output: llguidance vs outlines-core, on nanoseek's tokenizers.

    pip install outlines-core==0.2.14      # the alternative measured (llguidance is a nanoseek dependency)
    python benchmarks/structured_backends.py [--out benchmarks/results/structured_backends.json]

For each vocabulary (the main job's tokenizer, and a 32k byte-level BPE trained here on the Python
standard library's sources, the size class of real models) and each grammar (any JSON object, and the
schema LangChain's `with_structured_output` sends for a small pydantic model), it measures:
  - compile: grammar -> a matcher ready for the first token (outlines-core builds its whole token index
    up front; llguidance compiles lazily, so its first masks pay some of that),
  - mask: the mean time to compute one next-token mask while walking a valid document token by token
    (what a decode step pays per constrained sequence; llguidance writes a bitmask, outlines-core's
    `get_tokens` returns the allowed ids as a list),
  - whether the library can express the grammar at all.
xgrammar is not measured: its wheel requires triton (a GPU compiler), which a CPU install should not pull.
"""
import argparse
import glob
import json
import os
import sys
import sysconfig
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanoseek.tokenizer import Tokenizer  # noqa: E402

SCHEMA = {"title": "Person", "type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "role": {"enum": ["admin", "user", "guest"]},
                         "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "age", "role", "tags"], "additionalProperties": False}
DOC = '{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "engines", "notes"]}'
ANY_JSON = {"type": "object"}     # OpenAI's json_object: any JSON object


def tokenizers_under_test(main_job_dir: str | None) -> dict[str, Tokenizer]:
    out = {}
    if main_job_dir and os.path.exists(os.path.join(main_job_dir, "tokenizer.json")):
        out[f"main job ({Tokenizer.load(main_job_dir).vocab_size})"] = Tokenizer.load(main_job_dir)
    stdlib = sysconfig.get_paths()["stdlib"]
    texts = [open(f, encoding="utf-8", errors="ignore").read() for f in sorted(glob.glob(stdlib + "/*.py"))[:400]]
    out["32k BPE (stdlib sources)"] = Tokenizer.train(texts, 32000)
    return out


def walk(tok: Tokenizer) -> list[int]:
    return tok.encode(DOC)


def bench_llguidance(tok: Tokenizer, schema: dict, ids: list[int]) -> dict:
    import llguidance
    import torch
    from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask
    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok._tok.to_str(), eos_token=tok.eos_id)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    m = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
    t_compile = time.perf_counter() - t0
    if m.is_error():
        return {"supported": False, "error": m.get_error()}
    mask = allocate_token_bitmask(1, tok.vocab_size)
    times = []
    for t in ids:
        t0 = time.perf_counter()
        fill_next_token_bitmask(m, mask)
        times.append(time.perf_counter() - t0)
        allowed = bool((mask[0, t // 32] >> (t % 32)) & 1)
        if not allowed or not m.consume_token(t):
            return {"supported": True, "valid_doc_accepted": False}
    fill_next_token_bitmask(m, mask)
    eos_ok = bool((mask[0, tok.eos_id // 32] >> (tok.eos_id % 32)) & 1)
    del torch
    return {"supported": True, "valid_doc_accepted": eos_ok, "tokenizer_s": round(t_tok, 4),
            "compile_s": round(t_compile, 4), "first_mask_ms": round(times[0] * 1e3, 3),
            "mask_ms_mean": round(sum(times) / len(times) * 1e3, 4), "tokens": len(ids)}


def bench_outlines(tok: Tokenizer, schema: dict, ids: list[int]) -> dict:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema
    t0 = time.perf_counter()
    # outlines-core wants each token's bytes; a byte-level BPE stores them as stand-in characters
    from nanoseek.inference.responses import byte_symbols
    byte_of = byte_symbols()
    vocab: dict = {}
    for i in range(tok.vocab_size):
        if i == tok.eos_id:
            continue
        s = tok.id_to_token(i)
        b = bytes(byte_of[c] for c in s) if all(c in byte_of for c in s) else s.encode()
        vocab.setdefault(b, []).append(i)
    v = Vocabulary(tok.eos_id, vocab)
    t_tok = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        regex = build_regex_from_schema(json.dumps(schema))
        index = Index(regex, v)
        guide = Guide(index)
        t_compile = time.perf_counter() - t0
    except Exception as e:     # noqa: BLE001 - a library limit is the result being measured
        return {"supported": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    times = []
    for t in ids:
        t0 = time.perf_counter()
        allowed = guide.get_tokens()
        times.append(time.perf_counter() - t0)
        if t not in allowed:
            return {"supported": True, "valid_doc_accepted": False, "compile_s": round(t_compile, 4)}
        guide.advance(t)
    return {"supported": True, "valid_doc_accepted": tok.eos_id in guide.get_tokens(),
            "tokenizer_s": round(t_tok, 4), "compile_s": round(t_compile, 4),
            "first_mask_ms": round(times[0] * 1e3, 3), "mask_ms_mean": round(sum(times) / len(times) * 1e3, 4),
            "tokens": len(ids), "regex_chars": len(regex)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--main-job-tokenizer", default="runs/r1-zero/base/tokenizer")
    ap.add_argument("--out", default="benchmarks/results/structured_backends.json")
    args = ap.parse_args()
    results = []
    for name, tok in tokenizers_under_test(args.main_job_tokenizer).items():
        ids = walk(tok)
        for gname, schema in (("json_object", ANY_JSON), ("Person schema", SCHEMA)):
            for lib, fn in (("llguidance", bench_llguidance), ("outlines-core", bench_outlines)):
                r = {"vocab": name, "grammar": gname, "library": lib, **fn(tok, schema, ids)}
                print(json.dumps(r), flush=True)
                results.append(r)
    from nanoseek.calibrate import cpu_name
    cpu = cpu_name()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"cpu": cpu, "results": results}, f, indent=1)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
