"""Ending a training run cleanly: on SIGTERM or SIGINT, or before a wall-time limit.

Schedulers (Slurm, Kubernetes, `torchrun`'s agent) send SIGTERM and kill a little later; a person presses
Ctrl-C. `StopRequest.install()` turns the first SIGTERM or SIGINT into a request: the trainer finishes the step
it is in, writes a checkpoint and returns, and `dsv3 train` exits 0. A second SIGINT raises KeyboardInterrupt
at once (the run then resumes from the previous checkpoint). With a time limit the request comes by itself
once the time left is less than the slowest step so far plus the last checkpoint's write time.

Under `torchrun` every rank gets the signal, but not at the same instant: the trainer adds each rank's flag
to the step's metrics all-reduce, so all ranks stop after the same step.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int) -> float:
    """Seconds of `3600`, `45s`, `90m`, `2h`, `1d` or `H:MM:SS` / `MM:SS`; ValueError naming the value."""
    value = str(text).strip().lower()
    try:
        if ":" in value:
            seconds = 0.0
            for part in value.split(":"):
                seconds = seconds * 60 + float(part)
        elif value and value[-1] in _UNITS:
            seconds = float(value[:-1]) * _UNITS[value[-1]]
        else:
            seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or re.search(r"[^0-9.:smhd]", value):
        raise ValueError(f"time_limit must be a positive duration such as 3600, 90m, 2h or 1:30:00, got {text!r}")
    return seconds


class StopRequest:
    """Set by the first SIGTERM/SIGINT once `install`ed, or by the time limit; read once per step."""

    def __init__(self, time_limit: str | float | None = None, write=None) -> None:
        self.limit = None if time_limit is None else parse_duration(time_limit)
        self.start = time.monotonic()
        self.signal: str | None = None
        self.timed_out = False
        self._write = write or (lambda line: print(line, file=sys.stderr, flush=True))
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Catch SIGTERM and SIGINT (main thread only; elsewhere the defaults stay)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        if self.signal is None:
            self.signal = name
            self._write(f"got {name}: finishing this step, then saving a checkpoint and exiting "
                        "(Ctrl-C again stops at once)")

    def requested(self, slowest_step: float = 0.0, save_seconds: float = 0.0) -> bool:
        """True once a signal came, or when the time limit leaves no room for another step and a save."""
        if self.signal is not None:
            return True
        if self.limit is not None and time.monotonic() - self.start + slowest_step + save_seconds >= self.limit:
            self.timed_out = True
        return self.timed_out

    @property
    def reason(self) -> str:
        return self.signal or (f"time limit {self.limit:g} s" if self.timed_out else "another rank's stop request")
