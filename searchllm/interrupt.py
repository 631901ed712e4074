"""SIGINT and SIGTERM as an exception, so an interrupted driver unwinds like a failed one: the evaluator
actors are killed, the run dir's lock released, a locally started Ray shut down, and the user told how to go on.

Every artefact is written atomically as it is finished (files.py), so unwinding loses only the step in
flight. A second signal while the first unwinds exits at once (a user who means it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class Interrupted:
    """What the driver reports for a SIGINT/SIGTERM that arrived (`received`)."""

    signum: int
    stage: str

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


_got: dict[str, Any] = {}  # the signal received and the stage it arrived in (process-wide, like signals)


def received() -> Interrupted:
    """The interrupt being unwound (a plain KeyboardInterrupt counts as SIGINT while starting)."""
    return Interrupted(_got.get("signum", signal.SIGINT), _got.get("stage", "start"))


@contextlib.contextmanager
def during(stage: str):
    """Name the stage an interrupt arrives in (the innermost `during` names it)."""
    try:
        yield
    except KeyboardInterrupt:
        _got.setdefault("stage", stage)
        raise


def _first(signum: int, frame: Any) -> None:
    _got["signum"] = signum
    for s in SIGNALS:
        signal.signal(s, _again)
    # KeyboardInterrupt, whatever the signal: Ray's blocking calls turn it into their own KeyboardInterrupt
    # (and any other exception raised inside them into a SystemError).
    raise KeyboardInterrupt


def _again(signum: int, frame: Any) -> None:
    os.write(2, f"searchllm: {signal.Signals(signum).name} again: exiting now\n".encode())
    os._exit(128 + signum)


def catch() -> dict[int, Any]:
    """From now on the first SIGINT/SIGTERM raises KeyboardInterrupt (see `received`). Returns the handlers
    it replaced (for `release`). Called again after ray.init, which installs its own SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    _got.clear()
    return {s: signal.signal(s, _first) for s in SIGNALS}


def release(previous: dict[int, Any]) -> None:
    for s, handler in previous.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def cli(main: Callable[[Optional[list[str]]], int]) -> int:
    """The exit of a command line other than the driver's (export, evaluate): a SIGINT/SIGTERM ends it with
    one line and the signal's exit code. Their outputs are written atomically: a rerun redoes the rest."""
    previous = catch()
    try:
        return main(None)
    except KeyboardInterrupt:
        e = received()
        print(
            f"searchllm: interrupted by {e.name}; what was finished is kept: run the same command again",
            file=sys.stderr,
        )
        return e.exit_code
    finally:
        release(previous)
