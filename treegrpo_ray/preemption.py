"""Preemption: SIGTERM (Kubernetes deleting a pod or a RayJob, a spot node reclaimed, `ray job stop`)
or SIGINT (Ctrl-C) asks the driver to stop. The handler only records the signal; the driver checks
it between stages (and `collect` while it waits on the samplers), abandons sampling in flight, lets
an update in flight finish, writes a checkpoint of the last completed update and exits with
`EXIT[signal]` (143 for SIGTERM, 130 for SIGINT). A second signal exits at once: checkpoints are
written to a temporary folder and renamed, so the last complete one survives any kill.

Ray's driver installs a C++ SIGTERM handler that aborts the process (exit 134); `install` replaces
it, so it is called after Ray is initialised. Nothing here imports ray."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130}
_state: dict = {"signum": None, "at": None, "previous": {}}


class Preempted(Exception):
    """The run was asked to stop by a signal; `exit_code` is what the CLI returns."""

    def __init__(self, signum: int, detail: str = ""):
        self.signum, self.exit_code = signum, EXIT.get(signum, 1)
        super().__init__(f"{signal.Signals(signum).name} received{': ' + detail if detail else ''}")


def _handler(signum, frame) -> None:
    if _state["signum"] is not None:
        print(f"treegrpo_ray: second {signal.Signals(signum).name}: exiting now (the newest complete checkpoint "
              "is intact; checkpoint.resume=auto continues from it)", file=sys.stderr, flush=True)
        os._exit(EXIT.get(signum, 1))
    _state["signum"], _state["at"] = signum, time.monotonic()
    print(f"treegrpo_ray: {signal.Signals(signum).name} received: finishing the update in flight (sampling in "
          "flight is abandoned), then writing a checkpoint and exiting; send it again to exit at once",
          file=sys.stderr, flush=True)


def install() -> bool:
    """Take SIGTERM and SIGINT (main thread only; False elsewhere, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    _state["signum"] = _state["at"] = None
    for sig in EXIT:
        _state["previous"][sig] = signal.signal(sig, _handler)
    return True


def uninstall() -> None:
    for sig, previous in _state["previous"].items():
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    _state["previous"] = {}


def requested() -> int | None:
    """The signal received, if any."""
    return _state["signum"]


def seconds_since() -> float:
    return time.monotonic() - _state["at"] if _state["at"] is not None else 0.0


def check(detail: str = "") -> None:
    """Raise Preempted if a stop was asked for (called where work in flight may be abandoned)."""
    if _state["signum"] is not None:
        raise Preempted(_state["signum"], detail)
