"""Graceful stop: the first SIGINT/SIGTERM (``ray job stop`` sends SIGTERM) asks the driver to
finish the current epoch, write a checkpoint, remove the Serve applications it started and exit;
a second signal exits at once (KeyboardInterrupt, no checkpoint)."""

from __future__ import annotations

import contextlib
import signal
import threading

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class StopRequest:
    """A stop asked for by a signal (or by code: ``request("reason")``), read at epoch boundaries."""

    def __init__(self):
        self._event = threading.Event()
        self.reason: str | None = None

    def request(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()


class RunInterrupted(Exception):
    """The run stopped early on request, after writing a checkpoint; ``exit_code`` for the CLI."""

    def __init__(self, message: str, *, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest, *, log=print):
    """Routes SIGINT/SIGTERM to ``stop`` while the block runs (main thread only; restores the
    previous handlers after). Install it after ``ray.init``, which sets its own SIGTERM handler."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, _frame):
        name = signal.Signals(signum).name
        if stop.requested:
            log(f"gard: second signal ({name}): exiting now, without a checkpoint")
            raise KeyboardInterrupt
        stop.request(name)
        log(f"gard: {name} received: finishing the current epoch, then writing a checkpoint and exiting "
            f"(send it again to exit at once)")

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
