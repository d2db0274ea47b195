"""Turn a stage's flat config dataclass into argparse flags (`--max-steps 100`), plus `--config run.json`.

Each field becomes `--field-name`; its type comes from the default, its help from
`field(metadata={"help": ...})`; booleans get `--flag/--no-flag`. A JSON file given with `--config`
supplies defaults that explicit flags override. Unknown JSON keys are an error naming the key.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from .common import UserError


def _base_type(tp):
    if isinstance(tp, str):
        tp = {"int": int, "float": float, "str": str, "bool": bool}.get(tp.split("|")[0].strip(), str)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if args else str
    return tp


def parse(cls, argv=None, prog: str | None = None, description: str | None = None):
    hints = typing.get_type_hints(cls)
    ap = argparse.ArgumentParser(prog=prog, description=description,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--config", help="JSON file of defaults for these flags")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_ = f.metadata.get("help", " ")
        tp = _base_type(hints[f.name])
        if tp is bool:
            ap.add_argument(flag, default=default, action=argparse.BooleanOptionalAction, help=help_)
        elif f.metadata.get("choices"):
            ap.add_argument(flag, default=default, type=tp, choices=f.metadata["choices"], help=help_)
        else:
            ap.add_argument(flag, default=default, type=tp, help=help_, metavar=f.name.upper())
    args = ap.parse_args(argv)
    values = vars(args)
    if args.config:
        try:
            overrides = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"--config {args.config}: {e}") from None
        names = {f.name for f in dataclasses.fields(cls)}
        explicit = {a.lstrip("-").split("=")[0].replace("-", "_") for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for k, v in overrides.items():
            if k not in names:
                raise UserError(f"--config {args.config}: unknown key {k!r}")
            if k not in explicit:
                values[k] = v
    values.pop("config")
    return cls(**values)
