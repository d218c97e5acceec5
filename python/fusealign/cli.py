"""`fusealign sft|rm|dpo|ppo|compare` — flags built from the engine's dataclass configs (`--help` shows their docs).

    fusealign dpo                          # built-in task end to end: SFT policy, then DPO; prints metrics
    fusealign sft --data my.jsonl --model ./llama --max-steps 1000 --output-dir runs/sft
    fusealign dpo --resume --output-dir runs/dpo
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import MISSING, fields

from fusealign.engine.compare import run_compare
from fusealign.engine.config import CONFIGS
from fusealign.engine.recipes import RUNS as _TRAIN_RUNS

RUNS = {**_TRAIN_RUNS, "compare": run_compare}

_TYPES = {"int": int, "float": float, "str": str, "Optional[str]": str, "Optional[float]": float}


def _add_flags(parser: argparse.ArgumentParser, cls) -> None:
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata.get("help", "")
        default = f.default if f.default is not MISSING else None
        if f.type in ("bool", "Optional[bool]"):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_} (default: {default})")
        else:
            parser.add_argument(flag, type=_TYPES[f.type], default=default, help=f"{help_} (default: {default!r})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusealign", description="Fused-head alignment: SFT, reward model, DPO.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in CONFIGS.items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0],
                           description=(cls.__doc__ or "").strip(),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        _add_flags(p, cls)
    return parser


def main(argv=None) -> int:
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    try:
        cfg = CONFIGS[command](**args)
    except ValueError as e:  # config validation: a flag error, not a traceback
        print(f"fusealign {command}: error: {e}", file=sys.stderr)
        return 2
    summary = RUNS[command](cfg)
    if command != "compare":  # compare prints its own table
        print(json.dumps({k: v for k, v in summary.items() if v is not None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
