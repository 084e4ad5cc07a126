"""A loopback TCP proxy in front of a real server: it counts the bytes it carries each way and can cut a connection
in the middle of a response (a server or network that drops a connection mid-transfer)."""

from __future__ import annotations

import socket
import threading


class CuttingProxy:
    """Forwards 127.0.0.1:`port` to `upstream` (host, port). While `cuts` > 0, a connection that carried a request
    with `arm_on` in it (lower case) is closed after `cut_after` more response bytes, and `cuts` counts down."""

    def __init__(self, upstream: tuple[str, int], *, cuts: int = 0, cut_after: int = 10_000,
                 arm_on: bytes = b"range: bytes="):
        self.upstream, self.cuts, self.cut_after, self.arm_on = upstream, cuts, cut_after, arm_on
        self.cut = 0                      # connections cut so far
        self.sent = self.received = 0     # bytes client -> server, server -> client
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            state = {"armed": False, "left": 0}
            threading.Thread(target=self._pump, args=(client, server, True, state), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False, state), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, upward: bool, state: dict) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self._lock:
                    if upward:
                        self.sent += len(data)
                        if self.cuts > 0 and not state["armed"] and self.arm_on in data.lower():
                            state["armed"], state["left"] = True, self.cut_after
                    else:
                        if state["armed"] and self.cuts > 0 and len(data) >= state["left"]:
                            data = data[:state["left"]]
                            self.received += len(data)
                            self.cuts -= 1
                            self.cut += 1
                            dst.sendall(data)
                            raise ConnectionAbortedError("cut")
                        if state["armed"]:
                            state["left"] -= len(data)
                        self.received += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
