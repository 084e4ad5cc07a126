"""A TCP forwarder from an address pods can reach (the pod bridge's gateway) to a server the tests run on the
host's 127.0.0.1 (the S3 server): pods reach it as they would reach a cluster's object store endpoint."""

from __future__ import annotations

import socket
import threading


class Forwarder:
    def __init__(self, listen: tuple[str, int], target: tuple[str, int]):
        self.target = target
        self.sock = socket.create_server(listen, backlog=64)
        threading.Thread(target=self._accept, daemon=True, name=f"forward-{listen[1]}").start()

    def _accept(self) -> None:
        while True:
            try:
                inside, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                outside = socket.create_connection(self.target, timeout=10)
                outside.settimeout(None)
            except OSError:
                inside.close()
                continue
            done = threading.Semaphore(0)  # the second pump to finish closes both sockets
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=_pump, args=(a, b, done), daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _pump(src: socket.socket, dst: socket.socket, done: threading.Semaphore) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass
        if done.acquire(blocking=False):
            src.close()
            dst.close()
        else:
            done.release()
