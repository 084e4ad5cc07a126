"""Run the pipeline DAG on this machine: the embedded default (no cluster needed).

With one device slot every stage runs in this process, one after another. With more (`--gpus N`, default: every
visible GPU), each stage runs in a child process (`mysproj.pipeline.stage_process`) pinned to its slot with
CUDA_VISIBLE_DEVICES, independent GPU stages side by side and CPU stages beside them, by the rule of
`mysproj.pipeline.schedule` (the planner simulates the same walk). A stage whose manifest already matches its
config is skipped, so a re-run resumes where it stopped; a failed stage stops only the stages downstream of it.
Each child's output goes to `<log dir>/<stage output path>.log`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import queue
import signal
import subprocess  # nosec B404 - runs this Python with an argv list
import sys
import threading
import time
from collections.abc import Callable

from mysproj.errors import EXIT_BAD_INPUT, BadInput, redact, vanished
from mysproj.pipeline import dag, schedule
from mysproj.stages import registry
from mysproj.storage import is_local, local_path
from mysproj.storage.manifest import StageOutput, read_manifest
from mysproj.tracking import mlflow_log

log = logging.getLogger(__name__)
JOB_RECORD_VARS = ("MYSPROJ_OUT", "MYSPROJ_JOB_NAME", "MYSPROJ_NODE")  # a stage Job's, naming its failure record


def visible_gpus() -> int:
    return registry.visible_gpus()


def device_gib() -> float:
    """The smallest memory of this machine's GPUs in GiB, from `nvidia-smi` (0.0 without one). Not CUDA's
    device properties: asking CUDA would keep a context on a card the stages use."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],  # nosec B603 B607
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return min(float(x) for x in out.split()) / 1024  # MiB
    except (OSError, subprocess.SubprocessError, ValueError):
        return 0.0


def capacity(gpus: int, finetune_gpus: int = 1, share: int = 1, device_gib: float = 0.0) -> schedule.Capacity:
    """One slot, not shared: everything in turn, in this process. Else as many CPU stages as device slots beside
    them; `share` one-device stages a device at most, where their recorded memory fits in `device_gib`."""
    if gpus < 1:
        raise BadInput(f"--gpus {gpus}: needs at least one device slot")
    if not 1 <= finetune_gpus <= gpus:
        raise BadInput(f"--finetune-gpus {finetune_gpus}: must be between 1 and --gpus ({gpus})")
    if share < 1:
        raise BadInput(f"--share-gpu {share}: must be >= 1 (1: one stage a device)")
    if share > 1 and device_gib <= 0:
        raise BadInput(f"--share-gpu {share} needs each device's memory, and nvidia-smi gave none here: pass "
                       "--device-gib GIB")
    return schedule.Capacity(gpus, 0 if gpus == 1 and share == 1 else gpus, finetune_gpus, share, device_gib)


def select(nodes: list[dag.Node], only: list[str] | None) -> list[dag.Node]:
    """The nodes whose names start with one of `only` (all without it); the others count as done. A prefix that
    names no node is a typo: `BadInput` naming it."""
    if not only:
        return nodes
    for o in only:
        if not any(n.name.startswith(o) for n in nodes):
            raise BadInput(f"--only {o!r} names no stage of this pipeline; stages: "
                           f"{', '.join(n.name for n in nodes)}")
    return [n for n in nodes if any(n.name.startswith(o) for o in only)]


def default_log_dir(root: str) -> str:
    return os.path.join(local_path(root), "logs") if is_local(root) else os.path.abspath("mysproj-logs")


def run(cfg: dag.PipelineConfig, only: list[str] | None = None, *, gpus: int = 1, finetune_gpus: int = 1,
        share: int = 1, device_gib: float = 0.0, log_dir: str | None = None,
        cost: Callable[[dag.Node], float] | None = None, memory: Callable[[dag.Node], float | None] | None = None,
        on_event: Callable[[schedule.Event], None] | None = None) -> schedule.Outcome:
    """`memory(node)`: the GiB a stage is counted as holding where devices are shared (`share` > 1)."""
    nodes = dag.build(cfg)
    # Validate every stage's config before running any, so a typo fails in seconds, not after training.
    configs = registry.node_configs(nodes)
    nodes = select(nodes, only)
    cap = capacity(gpus, finetune_gpus, share, device_gib)
    parent_run(cfg)
    one_at_a_time = cap.devices == 1 and cap.share == 1
    executor = InProcess(configs) if one_at_a_time else ChildProcesses(log_dir or default_log_dir(cfg.root), cap)
    progress = _Progress(len(nodes), on_event)
    try:
        return schedule.walk(nodes, cap, executor, cost=cost, memory=memory or (lambda n: None), on_event=progress,
                             complete=lambda n: StageOutput(n.config["out"], n.stage, configs[n.name]).existing())
    finally:
        executor.close()


def parent_run(cfg: dag.PipelineConfig) -> None:
    """The run's MLflow parent run, made once before stages start side by side (each would otherwise make one)."""
    uri = cfg.tracking.get("mlflow_uri")
    error = mlflow_log.parent_run(uri, cfg.tracking.get("mlflow_experiment") or "mysproj", cfg.root.rstrip("/"),
                                  {"mysproj.recipe": cfg.recipe})
    if error:
        log.warning("mlflow: %s did not answer (%s); the run goes on, each stage tries it once", redact(uri), error)


class _Progress:
    def __init__(self, total: int, forward: Callable[[schedule.Event], None] | None):
        self.total, self.ended, self.forward = total, 0, forward

    def __call__(self, e: schedule.Event) -> None:
        if e.state == "running":
            log.info("[%d/%d] %s (%s) started on %s", self.ended + 1, self.total, e.name, e.stage, e.slot)
        else:
            self.ended += 1
            text = {"done": f"done in {e.seconds or 0:.1f}s", "skipped": "skipped as already complete",
                    "blocked": "not run: a stage it depends on failed",
                    "failed": f"FAILED after {e.seconds or 0:.1f}s: {e.error}"}[e.state]
            (log.error if e.state == "failed" else log.info)("[%d/%d] %s: %s", self.ended, self.total, e.name, text)
        if self.forward:
            self.forward(e)


class InProcess:
    """Every stage in this process, one at a time (`start` runs it; `wait` hands back how it ended)."""

    def __init__(self, configs: dict):
        self.configs, self.t0, self._ended = configs, time.monotonic(), None

    def start(self, node: dag.Node, devices: tuple[int, ...]) -> None:
        try:
            manifest = registry.run(node.stage, self.configs[node.name])
            self._ended = schedule.Finished(node.name, True, manifest=manifest)
        except BadInput as e:
            self._ended = schedule.Finished(node.name, False, str(e), bad_input=True)
        except FileNotFoundError as e:  # an input gone while the stage read it: as bad input, one line
            self._ended = schedule.Finished(node.name, False, vanished(e), bad_input=True)
        except Exception as e:  # noqa: BLE001 - one stage's crash must not stop the stages that do not need it
            log.exception("%s: crashed", node.name)
            self._ended = schedule.Finished(node.name, False, f"{type(e).__name__}: {e}")

    def wait(self) -> schedule.Finished:
        ended, self._ended = self._ended, None
        return ended

    def now(self) -> float:
        return time.monotonic() - self.t0

    def close(self) -> None:
        pass


class ChildProcesses:
    """Each stage in a child process on its slot's devices; fine-tuning on several under torchrun."""

    def __init__(self, log_dir: str, cap: schedule.Capacity):
        self.log_dir, self.t0 = log_dir, time.monotonic()
        self._ended: queue.Queue = queue.Queue()
        self._running: dict[str, tuple[dag.Node, subprocess.Popen, str]] = {}
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self._device_ids = visible.split(",") if visible else None  # slot i = the i-th device this process sees
        threads = os.environ.get("OMP_NUM_THREADS")
        self._threads = threads or str(max(1, (os.cpu_count() or 1) // (cap.devices + cap.cpu)))
        # A terminated runner (a time limit, `kill`) stops its children too instead of leaving them on the GPUs.
        self._on_term = None
        if threading.current_thread() is threading.main_thread():
            self._on_term = signal.signal(signal.SIGTERM, _exit_on_signal)

    def _env(self, node: dag.Node, devices: tuple[int, ...]) -> dict:
        ids = [self._device_ids[d] if self._device_ids else str(d) for d in devices]
        # The child's config comes from its spec alone. Without a stage Job's variables, its `run_stage` writes no
        # failure record into whatever folder this shell's MYSPROJ_OUT happens to name.
        env = {k: v for k, v in os.environ.items() if k not in JOB_RECORD_VARS}
        # A CPU stage sees no GPU, so it cannot take memory on a device another stage holds.
        return {**env, "CUDA_VISIBLE_DEVICES": ",".join(ids) if node.gpu else "", "OMP_NUM_THREADS": self._threads}

    @staticmethod
    def argv(node: dag.Node, devices: tuple[int, ...], spec: str) -> list[str]:
        """This Python running the stage; fine-tuning on several devices under torchrun, one process each."""
        stage = ["-m", "mysproj.pipeline.stage_process", spec]
        if node.stage == "finetune" and len(devices) > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                    str(len(devices)), *stage]
        return [sys.executable, *stage]

    def start(self, node: dag.Node, devices: tuple[int, ...]) -> None:
        base = os.path.join(self.log_dir, node.name)
        os.makedirs(os.path.dirname(base), exist_ok=True)
        with open(base + ".json", "w") as f:
            json.dump({"name": node.name, "stage": node.stage, "config": node.config}, f)
        with open(base + ".log", "ab") as out:
            proc = subprocess.Popen(self.argv(node, devices, base + ".json"), stdout=out,  # nosec B603 - argv list
                                    stderr=subprocess.STDOUT, env=self._env(node, devices),
                                    preexec_fn=_die_with_parent)
        self._running[node.name] = (node, proc, base + ".log")
        threading.Thread(target=lambda: self._ended.put((node.name, proc.wait())), daemon=True).start()

    def wait(self) -> schedule.Finished:
        name, code = self._ended.get()
        node, _, log_file = self._running.pop(name)
        if code == 0:
            return schedule.Finished(name, True, manifest=read_manifest(node.config["out"]))
        return schedule.Finished(name, False, f"exit code {code}: {_last_line(log_file)} (log: {log_file})",
                                 bad_input=code == EXIT_BAD_INPUT)

    def now(self) -> float:
        return time.monotonic() - self.t0

    def close(self) -> None:
        """Stop the children still running (an interrupt or an error in the runner itself)."""
        if self._on_term is not None:
            signal.signal(signal.SIGTERM, self._on_term)
        for _, proc, _ in self._running.values():
            if proc.poll() is None:
                proc.terminate()
        for _, proc, _ in self._running.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _die_with_parent() -> None:
    """In the child before it runs the stage: SIGTERM when the runner dies, even by `kill -9` (Linux's parent-death
    signal), so no stage goes on writing after its runner is gone. SIGTERM, not SIGKILL: torchrun passes it on to
    its workers, and fine-tuning stops at a step it can resume from. The output's lease keeps a re-run from
    writing beside a child still stopping."""

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: children stop when the runner stops them (`close`)
        pass


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.readlines()[-50:] if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or ["no output"])[-1]


def exit_code(outcome: schedule.Outcome) -> int:
    """0 when every stage completed; 64 when every failure was bad input; else 1."""
    if outcome.ok:
        return 0
    failed = outcome.of("failed")
    return EXIT_BAD_INPUT if failed and all(e.bad_input for e in failed) else 1
