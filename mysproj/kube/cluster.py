"""The few Kubernetes API calls the controller and `mysproj status` make, as plain dicts.

Everything above this module sees JSON-shaped dicts (what `kubectl get -o json` prints), so the controller logic
is tested against an in-memory fake with the same methods, and against the real API server end to end.
"""

from __future__ import annotations

import os

from mysproj.errors import BadInput

# (connect, read) seconds of every API call (a read urllib3 tries 4 times: a minute at most). The client waits
# forever by default: a connection that went dead without a reset (a moved API server, a dropped NAT entry) then
# holds the controller in TCP's backoff for many minutes; with a bound the pass fails, the controller says so and
# its next pass opens a new connection.
REQUEST_TIMEOUT = (10.0, 15.0)


class Cluster:
    """Namespace-scoped access through the official client: in-cluster credentials inside a pod, else
    $KUBECONFIG / ~/.kube/config (for `mysproj status` on a laptop)."""

    def __init__(self, namespace: str | None = None, context: str | None = None,
                 request_timeout: tuple[float, float] = REQUEST_TIMEOUT):
        from kubernetes import client, config  # noqa: PLC0415 - a slow import: only commands that talk to a cluster

        try:
            config.load_incluster_config()
            in_cluster_ns = _read(_SA_NAMESPACE)
        except config.ConfigException:
            # $KUBECONFIG as it is now: the client library reads it once, when it is first imported
            kubeconfig = os.environ.get("KUBECONFIG") or None
            try:
                config.load_kube_config(config_file=kubeconfig, context=context)
            except (config.ConfigException, FileNotFoundError, TypeError) as e:
                raise BadInput(f"no Kubernetes credentials: not in a pod and no kubeconfig ({e}); "
                               "set KUBECONFIG") from None
            in_cluster_ns = None
            if namespace is None:
                try:
                    _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                    namespace = (active or {}).get("context", {}).get("namespace")
                except (config.ConfigException, FileNotFoundError):
                    pass
        self.namespace = namespace or in_cluster_ns or "default"
        self.timeout = request_timeout
        self._client = client
        self.api = client.ApiClient()
        self.core = client.CoreV1Api(self.api)
        self.batch = client.BatchV1Api(self.api)

    def _plain(self, obj) -> dict:
        return self.api.sanitize_for_serialization(obj)

    def read_configmap(self, name: str) -> dict:
        return self._plain(self.core.read_namespaced_config_map(name, self.namespace, _request_timeout=self.timeout))

    def list_configmaps(self, selector: str) -> list[dict]:
        return self._plain(self.core.list_namespaced_config_map(self.namespace, label_selector=selector,
                                                                _request_timeout=self.timeout))["items"]

    def read_job(self, name: str) -> dict:
        return self._plain(self.batch.read_namespaced_job(name, self.namespace, _request_timeout=self.timeout))

    def list_jobs(self, selector: str) -> list[dict]:
        return self._plain(self.batch.list_namespaced_job(self.namespace, label_selector=selector,
                                                          _request_timeout=self.timeout))["items"]

    def list_pods(self, selector: str) -> list[dict]:
        return self._plain(self.core.list_namespaced_pod(self.namespace, label_selector=selector,
                                                         _request_timeout=self.timeout))["items"]

    def create_job(self, body: dict) -> bool:
        """Create the Job; False if one of that name exists already (a restarted controller re-creating it)."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - a slow import: only commands that talk to a cluster

        try:
            self.batch.create_namespaced_job(self.namespace, body, _request_timeout=self.timeout)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            if e.status == 422:
                raise BadInput(f"the API server rejected Job {body['metadata']['name']}: {e.body}") from None
            raise

    def stop_job(self, name: str, annotations: dict[str, str]) -> None:
        """Stop a Job from starting more pods (parallelism 0) and record why, without deleting its history."""
        body = {"metadata": {"annotations": annotations}, "spec": {"parallelism": 0}}
        self.batch.patch_namespaced_job(name, self.namespace, body, _request_timeout=self.timeout)

    def end_job(self, name: str, annotations: dict[str, str]) -> None:
        """Fail a Job now, whatever its backoffLimit: a deadline already past makes the Job controller mark it Failed
        (servers without podFailurePolicy would otherwise restart a controller that exits 64, with backoff)."""
        body = {"metadata": {"annotations": annotations}, "spec": {"activeDeadlineSeconds": 1}}
        self.batch.patch_namespaced_job(name, self.namespace, body, _request_timeout=self.timeout)

    def annotate_job(self, name: str, annotations: dict[str, str]) -> None:
        self.batch.patch_namespaced_job(name, self.namespace, {"metadata": {"annotations": annotations}},
                                        _request_timeout=self.timeout)

    def create_event(self, body: dict) -> bool:
        """Create a core/v1 Event; False if one of that name exists already (told before a controller restart)."""
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415 - a slow import: only commands that talk to a cluster

        try:
            self.core.create_namespaced_event(self.namespace, body, _request_timeout=self.timeout)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def list_events(self, involved: str) -> list[dict]:
        """The namespace's Events about object `involved` (by name), oldest first."""
        items = self._plain(self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={involved}", _request_timeout=self.timeout))["items"]
        return sorted(items, key=lambda e: e.get("firstTimestamp") or e.get("eventTime") or "")

    def pod_log(self, pod: str, tail_lines: int | None = None) -> str:
        # The raw response: the client would turn the log's bytes into their Python literal (b'...'), and a log that
        # happens to be valid JSON into an object.
        response = self.core.read_namespaced_pod_log(pod, self.namespace, tail_lines=tail_lines,
                                                     _preload_content=False, _request_timeout=self.timeout)
        try:
            return response.data.decode("utf-8", errors="replace")
        finally:
            response.release_conn()


_SA_NAMESPACE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None
