"""A clean stop on SIGTERM (``docker stop``, SLURM preemption, a job's time limit).

Outside training the signal raises :class:`~bids_roimae.errors.Terminated` at once (exit
143, no traceback). Inside :func:`deferred` it only sets a flag, which the training loop
reads after each optimiser step to save a checkpoint before stopping, so a requeued job
resumes with nothing lost. Without a handler, a process that is PID 1 in a container
would ignore SIGTERM altogether.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

from bids_roimae.errors import Terminated

_state = {"requested": False, "deferred": 0}


def _handler(signum, frame) -> None:
    _state["requested"] = True
    if not _state["deferred"]:
        raise Terminated(f"stopped by signal {signal.Signals(signum).name}")


def install() -> None:
    """Handle SIGTERM in this process (only possible from the main thread)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _handler)


def requested() -> bool:
    """Whether SIGTERM arrived since :func:`install`."""
    return bool(_state["requested"])


@contextmanager
def deferred() -> Iterator[None]:
    """Within this block SIGTERM only sets :func:`requested`; the caller stops cleanly."""
    _state["deferred"] += 1
    try:
        yield
    finally:
        _state["deferred"] -= 1
