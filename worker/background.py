"""The worker's background threads (console relay, guest watch, network sweep, watchdog): one daemon
thread each, started after the host's repair and stopped, in reverse, when the worker stops."""

from __future__ import annotations

import threading


class Background:
    """A daemon thread running ``_loop`` until ``stop`` sets ``_stop``; ``_loop`` waits on ``_stop``
    between its rounds, so a stop is noticed within one round."""

    #: the thread's name (``vmorch-<thread_name>``), as ``py-spy`` and the logs show it
    thread_name = "background"
    #: how long ``stop`` waits for the current round to end
    join_timeout = 5.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"vmorch-{self.thread_name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.join_timeout)

    def _loop(self) -> None:
        raise NotImplementedError
