"""The `vitkit` command line. Thin: it parses arguments, calls library functions and prints.

Each command is a pair: `_add_<name>(subparsers)` declares its arguments and `_cmd_<name>(args)` runs it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


# ----------------------------------------------------------------------------------------------------------------
# vitkit models [PATTERN]
# ----------------------------------------------------------------------------------------------------------------
def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models with params, GMACs, patch grid and tokens")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'vit_*_patch16_*'")
    p.add_argument("--no-flops", action="store_true", help="skip the GMAC count (faster)")
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from vitkit.models.summary import format_table, model_table

    rows = model_table(args.pattern, flops=not args.no_flops)
    if not rows:
        print(f"no model matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(format_table(rows))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# vitkit convert SRC DST_DIR
# ----------------------------------------------------------------------------------------------------------------
def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="convert a timm / Hugging Face / JAX .npz checkpoint to a vitkit directory")
    p.add_argument("src", help="checkpoint file (.pth .bin .safetensors .npz) or Hugging Face model directory")
    p.add_argument("dst", help="output directory (config.json + model.safetensors)")
    p.add_argument("--model", default=None, help="registered model name, for what shapes cannot decide (heads)")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from vitkit.weights import convert_checkpoint

    model = convert_checkpoint(args.src, args.dst, model_name=args.model, log=print)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst} ({n:,} parameters)")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Command table. Add a command by writing its _add_/_cmd_ pair above and listing _add_<name> here.
# ----------------------------------------------------------------------------------------------------------------
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_models,
    _add_convert,
]


def build_parser() -> argparse.ArgumentParser:
    from vitkit import __version__

    parser = argparse.ArgumentParser(prog="vitkit", description="Vision Transformers: train, inspect, convert.")
    parser.add_argument("--version", action="version", version=f"vitkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as e:
        # User errors: one clear line, no traceback. Set VITKIT_DEBUG=1 for the traceback.
        import os

        if os.environ.get("VITKIT_DEBUG"):
            raise
        print(f"vitkit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
