"""`fusealign sft|rm|dpo|ppo|compare|plot` — flags built from the engine's dataclass configs (`--help` shows their
docs).

    fusealign dpo                          # built-in task end to end: SFT policy, then DPO; prints metrics
    fusealign sft --data my.jsonl --model ./llama --max-steps 1000 --output-dir runs/sft
    fusealign dpo --resume --output-dir runs/dpo
    fusealign plot runs/dpo                # loss, rewards/margins, KL, lr against step -> runs/dpo/metrics.png

Failing like a Unix tool: an error the user can fix (bad flag, data, path, model directory, an unsafe
checkpoint, out of GPU memory) prints one line, `fusealign <command>: error: …`, and exits 2; `--debug`
(or FUSEALIGN_DEBUG=1) shows the traceback. SIGINT / SIGTERM stop after the current step with a
checkpoint, print the command that resumes, and exit 130 / 143. Anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import sys
from dataclasses import MISSING, fields

from fusealign.engine.config import CONFIGS as _TRAIN_CONFIGS
from fusealign.engine.config import MODEL_DEFAULTS, by_model, by_model_bundle
from fusealign.engine.distributed import shutdown
from fusealign.engine.errors import Interrupted, UserError
from fusealign.engine.recipes import RUNS as _TRAIN_RUNS
from fusealign.engine.study.compare import run_compare
from fusealign.engine.study.config import CompareConfig

CONFIGS = {**_TRAIN_CONFIGS, "compare": CompareConfig}
RUNS = {**_TRAIN_RUNS, "compare": run_compare}

_TYPES = {"int": int, "float": float, "str": str, "Optional[str]": str, "Optional[float]": float,
          "Optional[int]": int}
_LISTS = {"list[str]": str, "Optional[list[float]]": float}  # space-separated values: --loss-type sigmoid sft
_BUNDLE = "bundle."  # argparse dest prefix of a bundle's field: bundle.<bundle field> (shared by every bundle)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default(f):
    return f.default if f.default is not MISSING else f.default_factory() if f.default_factory is not MISSING else None


def _shown(default) -> str:
    """A default as the flag would be typed: lists space-separated, strings unquoted."""
    if isinstance(default, (list, tuple)):
        return " ".join(map(str, default))
    return "none" if default is None else '""' if default == "" else str(default)


def _add_flag(parser: argparse.ArgumentParser, f, default, dest: str, aliases=(), shown=None) -> None:
    """One flag for dataclass field `f`: its help text with its default (once: `shown`, else `default` as typed),
    its type; lists space-separated."""
    help_ = f.metadata.get("help", "")
    if shown is not None or "default:" not in help_:  # a help text that states its default keeps it
        help_ = f"{help_} (default: {shown or _shown(default)})"
    names = [_flag(f.name), *(_flag(a) for a in aliases)]
    meta = {} if dest == f.name else {"metavar": f.name.upper()}
    if f.type in ("bool", "Optional[bool]"):
        parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_)
    elif f.type in _LISTS or "nargs" in f.metadata:
        item = _LISTS.get(f.type) or f.metadata.get("item", str)
        parser.add_argument(*names, dest=dest, type=item, nargs="+", default=default, help=help_, **meta)
    else:
        parser.add_argument(*names, dest=dest, type=_TYPES[f.type], default=default, help=help_, **meta)


def _add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per config field; for a field holding a loss-options bundle (`bundle` metadata: fa.DPOOptions,
    fa.PPOOptions, fa.GRPOOptions), a flag per field of the bundle that the config neither defines itself nor derives
    from the run, with the bundle's help text and the config's default bundle's value (and its aliases, e.g. DPO's
    --gamma for --simpo-gamma). A name in two bundles of one config is one flag, setting both. Bundle flags parse
    to None when not given, so that only the options given replace the default bundle's; a default that depends
    on the model (MODEL_DEFAULTS) shows both values."""
    own = {f.name for f in fields(cls)}
    kind_defaults = MODEL_DEFAULTS.get(getattr(cls, "KIND", ""), {})
    for f in fields(cls):
        if f.metadata.get("bundle"):
            bundle = f.metadata["cls"]()
            aliases = {new: old for old, new in getattr(type(bundle), "ALIASES", {}).items()}
            for g in fields(bundle):
                if g.name in own or g.name in f.metadata.get("derived", ()):
                    continue
                own.add(g.name)
                key = f"{f.name}.{g.name}"
                shown = by_model(cls.KIND, key) if key in kind_defaults else \
                    None if "default:" in g.metadata.get("help", "") else _shown(getattr(bundle, g.name))
                _add_flag(parser, g, None, _BUNDLE + g.name, [aliases[g.name]] if g.name in aliases else (), shown)
        else:
            shown = by_model(cls.KIND, f.name) if f.metadata.get("by_model") else f.metadata.get("shown")
            _add_flag(parser, f, _default(f), f.name, shown=shown)


def build_config(cls, args: dict):
    """The config dataclass from parsed flags: each bundle is its default (for the run's model, where that
    matters) with the options given on the command line (validated there)."""
    flagged = {k[len(_BUNDLE):]: v for k, v in [(k, args.pop(k)) for k in [k for k in args if k.startswith(_BUNDLE)]]
               if v is not None}
    for f in fields(cls):
        if f.metadata.get("bundle"):
            bundle_cls = f.metadata["cls"]
            base = by_model_bundle(cls, f.name, args.get("model", "builtin")) if f.default is None else _default(f)
            names = [g.name for g in fields(bundle_cls)]
            try:
                args[f.name] = dataclasses.replace(base, **{n: flagged[n] for n in names if n in flagged})
            except (ValueError, TypeError) as e:  # the bundle's own message, in flag spelling
                longest_first = sorted(names, key=len, reverse=True)
                raise ValueError(re.sub(r"\b(" + "|".join(longest_first) + r")\b", lambda m: _flag(m.group(1)),
                                        str(e))) from None
    return cls(**args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusealign", description="Fused-head alignment: SFT, reward model, DPO, "
                                                                   "PPO, and the PPO-vs-DPO study.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of expected errors too "
                                                             "(also: FUSEALIGN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in CONFIGS.items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0],
                           description=(cls.__doc__ or "").strip())
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
        _add_flags(p, cls)
    p = sub.add_parser("plot", help="draw a run's loss, rewards/margins, KL and learning rate against step (PNG)",
                       description="Loss, rewards/margins, KL and learning rate against step, from RUN_DIR/"
                                   "metrics.jsonl, as one PNG (every run also writes RUN_DIR/metrics.png at its end).")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holding metrics.jsonl)")
    p.add_argument("--out", default=None, help="where to write the PNG (default: RUN_DIR/metrics.png)")
    return parser


def _quiet_libraries() -> None:
    """No per-load progress bars from transformers (dozens in one `compare`), no hub progress either."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # transformers is a dependency; without it the run fails later with its own message
        pass


def _resume_hint(command: str, argv) -> str:
    if command == "compare":  # compare reuses finished stages and resumes interrupted ones by itself
        return "re-run the same command to continue: " + shlex.join(["fusealign", command, *argv])
    args = [a for a in argv if a != "--resume"]
    return "continue with: " + shlex.join(["fusealign", command, *args, "--resume"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = vars(build_parser().parse_args(argv))
    command = args.pop("command")
    debug = args.pop("debug", False) or os.environ.get("FUSEALIGN_DEBUG", "") not in ("", "0")
    _quiet_libraries()

    def fail(message: str) -> int:
        print(f"fusealign {command}: error: {message}", file=sys.stderr)
        return 2

    if command == "plot":
        from fusealign.engine.plot import plot_run

        try:
            print(plot_run(args["run_dir"], args["out"]))
        except UserError as e:
            if debug:
                raise
            return fail(str(e))
        return 0
    try:
        cfg = build_config(CONFIGS[command], args)
    except ValueError as e:  # config validation: a flag error, not a traceback
        return fail(str(e))
    try:
        summary = RUNS[command](cfg)
        shutdown(clean=True)
    except Interrupted as e:
        sub_argv = argv[argv.index(command) + 1:] if command in argv else argv
        name = signal.Signals(e.signum).name
        print(f"fusealign {command}: stopped by {name} after step {e.step}; checkpoint {e.checkpoint}\n"
              f"fusealign {command}: {_resume_hint(command, sub_argv)}", file=sys.stderr)
        return 128 + e.signum
    except UserError as e:
        if debug:
            raise
        return fail(str(e))
    except Exception as e:
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError) and not debug:
            return fail("out of GPU memory: lower --batch-size or --max-length, or pass --gradient-checkpointing "
                        f"({str(e).splitlines()[0][:160]})")
        raise
    finally:
        shutdown(clean=False)  # no-op after the clean shutdown above
    if command != "compare" and int(os.environ.get("RANK", "0")) == 0:  # compare prints its own table
        print(json.dumps({k: v for k, v in summary.items() if v is not None}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
