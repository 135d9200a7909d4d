"""``cellsam`` command line: one sub-command per stage, each in its own module.

Each module in ``COMMANDS`` defines ``register(subparsers)`` (adds its parser, sets
``func=run``) and ``run(args) -> int``. Heavy imports (torch, dask) happen inside ``run``.
Expected failures raise :class:`pipeline.errors.PipelineError`; they are printed as one line
``cellsam: error: ...`` on stderr with the error's exit code (traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .. import __version__
from ..errors import PipelineError

COMMANDS = ["demo", "tile", "infer", "export", "segment", "predict", "evaluate", "train", "distill", "check", "cohort"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``cellsam: error: <command>: <problem>`` (exit 2), like PipelineError.

    Sub-command parsers inherit the class (``add_subparsers`` uses the parent's class).
    """

    def error(self, message):
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"cellsam: error: {command}{message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cellsam", description="CellSAM whole-slide nucleus segmentation")
    parser.add_argument("--version", action="version", version=f"cellsam {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--quiet", action="store_true", help="only warnings and errors, no progress bars")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except PipelineError as exc:
        if args.debug:
            raise
        print(f"cellsam: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("cellsam: error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        if args.debug:
            raise
        print("cellsam: error: out of memory (try a smaller --chunk or --batch-size)", file=sys.stderr)
        return 9
    except OSError as exc:  # disk full, permission denied... not anticipated by a stage
        if args.debug:
            raise
        where = f" {exc.filename}:" if getattr(exc, "filename", None) else ""
        print(f"cellsam: error:{where} {exc.strerror or exc}", file=sys.stderr)
        return 8


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
