"""Shared by the benchmark scripts: print a result and keep it in benchmarks/results/NAME.json."""
import json
from pathlib import Path


def report(name: str, res: dict) -> None:
    text = json.dumps(res, indent=2)
    print(text)
    out = Path(__file__).parent / "results" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
