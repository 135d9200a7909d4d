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

COMMANDS = ["demo", "tile", "infer", "export", "segment", "predict", "evaluate", "train", "train_types", "distill", "check", "cohort"]


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line ``cellsam: error: <command>: <problem>`` (exit 2), like PipelineError.

    Sub-command parsers inherit the class (``add_subparsers`` uses the parent's class).
    """

    def error(self, message):
        command = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"cellsam: error: {command}{message} (see `{self.prog} --help`)\n")


def exit_codes_text() -> str:
    """The exit-code table of ``cellsam --help`` (from :mod:`pipeline.errors`; README "Exit codes")."""
    from .. import errors

    rows = [(0, "success")]
    for cls in (errors.PipelineError, errors.InputError, errors.SlideReadError, errors.ConfigError, errors.ModelError,
                errors.StoreError, errors.StitchError, errors.OutputError):
        doc = (cls.__doc__ or "").strip().splitlines()[0].rstrip(".")
        rows.append((cls.exit_code, f"{cls.__name__}: {doc[0].lower() + doc[1:]}"))
    rows[1] = (1, "any other expected error; `cellsam cohort`: no slide succeeded")
    rows[2] = (2, rows[2][1] + "; also command-line usage errors")
    rows[8] = (8, rows[8][1] + "; also any unanticipated OS error")
    rows += [(9, "out of memory (try a smaller --chunk or --batch-size)"), (130, "interrupted (Ctrl-C)")]
    return "exit codes:\n" + "\n".join(f"  {code:<4d} {text}" for code, text in rows)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cellsam", description="CellSAM whole-slide nucleus segmentation",
                     epilog=exit_codes_text() + "\n\nerrors are one line on stderr (`cellsam: error: ...`); "
                     "--debug shows the traceback. `cellsam COMMAND --help` for each command.",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
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
