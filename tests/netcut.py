"""A TCP proxy on the loopback that a test can cut: a network partition between one process and Redis.

``NetCut(port)`` listens on ``127.0.0.1:<free port>`` and forwards each connection to
``127.0.0.1:port``. ``blackhole()`` stops forwarding in both directions at once, without closing
anything: bytes already sent stay in flight (held here or in the kernel's buffers, as TCP keeps
retransmitting them), so reads on either side hang as in a real partition, and a new connection
is accepted by the kernel but carries nothing. ``heal()`` delivers what was held, in order, and
forwarding goes on. Threads only; every thread and socket ends with ``close()``.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType

#: how often a blocked step looks at the switch and at ``close()``
_TICK_S = 0.05


class NetCut:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_TICK_S)
        self.port = int(self._listener.getsockname()[1])
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        #: (monotonic time, "cut" | "healed"), for the test's report
        self.history: list[tuple[float, str]] = []
        self._spawn(self._accept_loop, "netcut-accept")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def cut(self) -> bool:
        return not self._flowing.is_set()

    def blackhole(self) -> float:
        """Stop forwarding (both directions, every connection); returns the monotonic time of the cut."""
        self._flowing.clear()
        at = time.monotonic()
        self.history.append((at, "cut"))
        return at

    def heal(self) -> float:
        """Forward again, what was held first; returns the monotonic time of the heal."""
        at = time.monotonic()
        self._flowing.set()
        self.history.append((at, "healed"))
        return at

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()
        for t in self._threads:
            t.join(timeout=2)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"netcut threads still running: {alive}"

    def __enter__(self) -> NetCut:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- forwarding ---------------------------------------------------------------------

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _wait_flowing(self) -> bool:
        """Block while cut; False once closed."""
        while not self._closed.is_set():
            if self._flowing.wait(_TICK_S):
                return not self._closed.is_set()
        return False

    def _accept_loop(self) -> None:
        while self._wait_flowing():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=2)
            except OSError:
                client.close()
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.settimeout(_TICK_S)
            with self._lock:
                self._sockets |= {client, upstream}
            self._spawn(self._pump, "netcut-up", client, upstream)
            self._spawn(self._pump, "netcut-down", upstream, client)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self._wait_flowing():
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                # Read just as the cut came (or cut while sending): held until the heal, as the network would.
                view = memoryview(data)
                while view:
                    if not self._wait_flowing():
                        return
                    try:
                        view = view[dst.send(view):]
                    except TimeoutError:
                        continue
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets -= {src, dst}
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()
