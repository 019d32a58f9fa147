"""`amc-mobile` entry point: a thin parser; every subcommand lives in its own module here.

Each module in this package that defines `register(subparsers)` adds its subcommand(s);
the parser it adds sets `func`, which gets the parsed args and returns an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import pkgutil
import sys
import warnings

from amc_mobile import __version__
from amc_mobile.errors import AmcError


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (every bad input is one line, like an AmcError) that points at --help;
    subcommand parsers are of this class too (add_subparsers uses the parent's class)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def finite_float(text: str) -> float:
    """argparse type of every float option: NaN and infinity are never a meaningful setting."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def seed(text: str) -> int:
    """argparse type of every --seed: numpy takes 0 .. 2**32-1 only, and fails late (after measuring)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and {2**32 - 1}")
    return value


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield sub
                yield from _subparsers(sub)


def _verbosity_everywhere(parser: argparse.ArgumentParser) -> None:
    """-v/--verbose and -q/--quiet before or after any subcommand. The subcommands' copies default
    to SUPPRESS, so a flag given before the subcommand is not reset by the subcommand's default."""
    for sub in _subparsers(parser):
        have = {s for a in sub._actions for s in a.option_strings}
        if "--verbose" not in have:
            sub.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                             help="show library logs and full tracebacks")
        if "--quiet" not in have:
            sub.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                             help="no progress bars")
        for a in sub._actions:
            if a.dest in ("verbose", "quiet"):
                a.default = argparse.SUPPRESS


def _checked_numbers(parser: argparse.ArgumentParser) -> None:
    """Give every float option `finite_float` and every --seed `seed`, in every subcommand."""
    for action in parser._actions:
        if action.type is float:
            action.type = finite_float
        elif action.dest == "seed" and action.type is int:
            action.type = seed
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _checked_numbers(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="amc-mobile",
        description="AMC channel pruning with latency measured on the target device.",
    )
    parser.add_argument("--version", action="version", version=f"amc-mobile {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and full tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    _checked_numbers(parser)
    _verbosity_everywhere(parser)
    return parser


def _quiet_libraries() -> None:
    # torch.export and ExecuTorch are chatty; users want our progress bars, not their warnings.
    warnings.filterwarnings("ignore")
    for name in ("torch", "executorch", "torchao", "root"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.verbose:
        _quiet_libraries()
    try:
        return int(args.func(args) or 0)
    except AmcError as exc:
        if args.verbose:
            raise
        print(f"amc-mobile: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("amc-mobile: interrupted; every measurement taken so far is saved (rerun to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
