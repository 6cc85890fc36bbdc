"""Ctrl-C and SIGTERM during training: the first asks the loop to stop after the current
step (and save), a second Ctrl-C interrupts at once."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def stop_on_signals(flag: threading.Event) -> Iterator[None]:
    """While training, SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step
    and save a checkpoint; a second Ctrl-C interrupts at once. Only the main thread can set
    signal handlers; elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.set()

    for s in previous:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


__all__ = ["stop_on_signals"]
