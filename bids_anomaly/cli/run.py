"""Entry point: parse, run the level, map failures to exit codes and one-line messages."""

from __future__ import annotations

import logging
import os
import sys
import traceback

from bids_anomaly.errors import BidsAnomalyError, Interrupted, one_line

LOGGER = logging.getLogger("bids_anomaly")


class _OneLineFormatter(logging.Formatter):
    """Log lines with their control characters escaped: a path with a newline stays on its line.

    Debug messages and tracebacks keep theirs.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        return one_line(text) if record.levelno >= logging.INFO else text


def _configure_logging(verbose: int) -> None:
    from bids_anomaly.runtime.execution import quiet_library_warnings

    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(_OneLineFormatter("%(levelname)s %(name)s: %(message)s"))
    LOGGER.setLevel(min(level, logging.INFO))
    quiet_library_warnings(debug=verbose > 1)


def run_level(argv: list[str]) -> None:
    """Parse ``argv`` and run the requested level (raises BidsAnomalyError on failure)."""
    from bids_anomaly.cli.parser import build_demo_parser, parse_arguments, settings_from_args

    if argv and argv[0] == "demo":
        args = build_demo_parser().parse_args(argv[1:])
        _configure_logging(args.verbose)
        from bids_anomaly.cli.demo import run_demo

        run_demo(args.output_dir, n_healthy=args.healthy, n_patients=args.patients,
                 nprocs=args.nprocs, device=args.device, random_seed=args.random_seed,
                 verbose=args.verbose, modalities=tuple(args.modalities))
        return
    args, config = parse_arguments(argv)
    _configure_logging(getattr(args, "execution.verbose", 0))
    settings = settings_from_args(args, config)
    from bids_anomaly import levels

    line = levels.run(settings)
    if line:
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return its exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if "--version" in argv:  # answered before the heavy imports
        from bids_anomaly import __version__

        print(f"bids_anomaly {__version__}")
        return 0
    from bids_anomaly.runtime.execution import interruptible

    try:
        with interruptible():
            run_level(argv)
    except BidsAnomalyError as error:
        print(f"bids_anomaly: error: {one_line(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as interrupt:
        name = interrupt.args[0] if isinstance(interrupt, Interrupted) else "SIGINT"
        print(f"bids_anomaly: stopped by {name}; workers stopped; rerun with the same work "
              "directory to resume", file=sys.stderr)
        return getattr(interrupt, "exit_code", 130)
    except Exception as error:  # a bug: say so in one line, keep the traceback in the log
        LOGGER.debug("unexpected failure", exc_info=True)
        print(f"bids_anomaly: internal error: {error.__class__.__name__}: "
              f"{one_line(str(error))} (rerun with -vv for the traceback; please report it)",
              file=sys.stderr)
        if os.environ.get("BIDS_ANOMALY_DEBUG"):
            traceback.print_exc()
        return 1
    return 0
