"""What a person sees: a header per stage, live progress, a one-line summary; everything else goes to a log.

    console.start(logs_dir, verbose=False)     # the CLI (and jobs/) call this once
    with console.stage("train") as st:         # framework output of the stage -> <logs_dir>/train.log
        ...
        st.live("step 40/500 | loss 0.61 ...")  # one line, rewritten in place on a terminal
        console.say("result line")             # always on the console

Ray, Ray Data/Train/Serve, vLLM, DeepSpeed and transformers write INFO lines and warnings from the driver and,
through Ray's log streaming, from every worker and replica. Quiet mode points the process's stdout and stderr
(file descriptors 1 and 2, so C extensions and child processes too) at the stage's log file and keeps a
duplicate of the real stdout for cpo-ray's own lines. A stage that fails prints its traceback and the log's
path. `--verbose` or CPO_RAY_VERBOSE=1 leaves the streams alone. Without start() (library use, tests), say()
is print().
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from pathlib import Path

_out = None  # the real stdout (a duplicate of fd 1 taken before redirecting); None = not started
_err = None  # the real stderr, for error lines
_logs: Path | None = None
_verbose = True


def start(logs_dir: str | Path, verbose: bool = False) -> None:
    """From now on (quiet mode) the process's own output goes to <logs_dir>/cpo-ray.log, each stage's to
    <logs_dir>/<stage>.log; cpo-ray's lines to the real stdout. Never switched back: Ray streams worker
    output to the driver from a background thread, and late lines must not land on the console."""
    global _out, _err, _logs, _verbose
    _verbose = verbose or os.environ.get("CPO_RAY_VERBOSE", "") not in ("", "0")
    _logs = Path(logs_dir)
    if _out is None:
        sys.stdout.flush()
        sys.stderr.flush()
        _out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
        _err = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    if not _verbose:
        _quiet_python_loggers()
        _point(_logs / "cpo-ray.log")


def _point(log: Path) -> None:
    """fds 1 and 2 (Python's streams, C code, child processes) append to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def say(line: str = "") -> None:
    """A line on the console (and in the current stage's log)."""
    _clear_live()
    if _out is None:
        print(line, flush=True)
        return
    _out.write(line + "\n")
    if not _verbose:
        print(line, flush=True)  # the log file gets it too, in context


def error(line: str) -> None:
    """A line on the real stderr (and in the log)."""
    _clear_live()
    print(line, file=sys.stderr, flush=True)
    if _err is not None and not _verbose:
        _err.write(line + "\n")


_live_width = 0


def live(line: str) -> None:
    """Progress: rewritten in place on a terminal; elsewhere (job logs, CI) printed as a line."""
    global _live_width
    if _out is None or not _out.isatty():
        say(line)
        return
    _out.write("\r" + line.ljust(_live_width))
    _out.flush()
    _live_width = len(line)


def _clear_live() -> None:
    global _live_width
    if _live_width and _out is not None:
        _out.write("\r" + " " * _live_width + "\r")
        _live_width = 0


@contextlib.contextmanager
def stage(name: str):
    """Header, redirect (quiet mode), timing, and on failure the traceback plus the log's path."""
    quiet = _out is not None and not _verbose and _logs is not None
    log = _logs / f"{name}.log" if _logs else None
    if quiet:
        _point(log)
    say(f"── {name} " + "─" * max(3, 60 - len(name)))
    t0 = time.time()
    try:
        yield sys.modules[__name__]
    except BaseException as e:
        if not isinstance(e, SystemExit | KeyboardInterrupt):
            if getattr(e, "user_error", False):  # bad input or config: its message says it all (the CLI prints it)
                print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
            else:  # a failure: the whole traceback on the console too
                tb = "".join(traceback.format_exception(e))
                print(tb, file=sys.stderr, flush=True)
                if _err is not None and not _verbose:
                    _clear_live()
                    _err.write(tb)
            where = f"; full log: {log}" if quiet else ""
            error(f"✗ {name} failed after {time.time() - t0:.0f}s{where}")
        raise
    finally:
        if quiet:  # late output of this stage's workers lands in the run's general log, not the console
            _point(_logs / "cpo-ray.log")


def _quiet_python_loggers() -> None:
    """Framework loggers to WARNING (their INFO lines are what buries the result), still into the log file."""
    import logging
    import warnings

    for name in (
        "ray",
        "ray.data",
        "ray.train",
        "ray.serve",
        "ray.llm",
        "vllm",
        "DeepSpeed",
        "deepspeed",
        "transformers",
        "filelock",
    ):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # replicas inherit it through the runtime env
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
