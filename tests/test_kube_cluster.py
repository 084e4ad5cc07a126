"""`Cluster`, the controller's and `mysproj status`'s access to the API server, bounds every call: an API server
that takes a request and never answers (a connection gone dead without a reset) fails the call instead of holding
the controller's pass for as long as TCP keeps retrying. The kubeconfig named by $KUBECONFIG now is the one read,
its current context's namespace included (the client library fixes its default path when first imported)."""

from __future__ import annotations

import socket
import threading

import kubernetes.config  # noqa: F401 - imported before a test sets KUBECONFIG, as in a long-lived process
import pytest
import urllib3

from mysproj.kube.cluster import Cluster


@pytest.fixture
def silent_api_server():
    """A listener that accepts connections and reads what is sent, never answering; the requests it took."""
    server = socket.create_server(("127.0.0.1", 0))
    taken: list[bytes] = []
    stop = threading.Event()

    def serve():
        server.settimeout(0.1)
        conns = []
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conns.append(conn)
            taken.append(conn.recv(65536))
        for c in conns:
            c.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1], taken
    stop.set()
    thread.join()
    server.close()


def test_a_call_to_an_api_server_that_never_answers_fails_within_its_bound(silent_api_server, tmp_path,
                                                                         monkeypatch):
    port, taken = silent_api_server
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(f"""
apiVersion: v1
kind: Config
clusters: [{{name: c, cluster: {{server: "http://127.0.0.1:{port}"}}}}]
users: [{{name: u, user: {{token: t}}}}]
contexts: [{{name: x, context: {{cluster: c, user: u, namespace: ns}}}}]
current-context: x
""")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cluster = Cluster(request_timeout=(1.0, 0.3))
    with pytest.raises((urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.MaxRetryError)):
        cluster.list_jobs("mysproj.io/run=r")
    assert taken and taken[0].startswith(b"GET /apis/batch/v1/namespaces/ns/jobs?labelSelector="), taken
