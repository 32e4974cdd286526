"""Signal routing for long work: the training loop turns SIGTERM into a stop at the next step; the sweep turns
SIGTERM and SIGINT into a stop of its worker processes."""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Sequence

__all__ = ["signal_handlers"]


@contextlib.contextmanager
def signal_handlers(handler: Callable, signums: Sequence[int] = (signal.SIGTERM,)) -> Iterator[None]:
    """Route `signums` to `handler(signum, frame)` while the block runs; the previous handlers come back after it.
    Python runs handlers in the main thread only, so elsewhere (a test runner's thread) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
