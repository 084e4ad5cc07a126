"""Which stage runs when, and on which slot: the one rule that the local runner follows and the planner simulates.

Slots: `devices` device slots (the GPUs; on a machine without one, simulated slots that run on the CPU) and `cpu`
slots for CPU stages beside them. A GPU stage takes one device slot (fine-tuning `finetune_devices`, under
torchrun); a CPU stage takes a CPU slot, or a device slot where `cpu` is 0 (one queue for everything).

Sharing a device (`share` > 1): a one-device stage that finds no free device may join a device on which fewer than
`share` one-device stages run, where the recorded peak memory of each of them and of the newcomer
(`memory(node)`, GiB; sharing needs a record for every one) plus `CONTEXT_GIB` a process fits in `FILL` of
`device_gib`. A free device is always taken first. Stages side by side slow each other where both are bound by
the GPU; what sharing wins is the time one leaves the GPU idle (compiling, loading, writing, decoding on the host).

The rule: at the start and whenever a stage finishes, go through the stages whose dependencies are all complete,
highest priority first (the most work still ahead on its longest downstream chain, then DAG order), and start each
one that fits in the free slots now; one that does not fit yet lets the next one start. A stage whose output is
already complete is taken as done without a slot (resume). A failed stage blocks everything downstream of it;
the rest runs on.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mysproj.pipeline.dag import Node

# Device memory a stage's process holds outside PyTorch's allocator (CUDA context, cuBLAS and nvJPEG workspaces),
# and the share of the card that stages side by side may fill: the rest is left to fragmentation.
CONTEXT_GIB = 1.5
FILL = 0.92


@dataclass(frozen=True)
class Capacity:
    devices: int
    cpu: int = 0
    finetune_devices: int = 1
    share: int = 1            # one-device stages a device may run at once, memory allowing
    device_gib: float = 0.0   # each device's memory (sharing needs it)

    def __post_init__(self):
        if self.devices < 1 or self.cpu < 0 or self.share < 1:
            raise ValueError(f"capacity needs at least one device slot, no negative CPU slots and a share of at "
                             f"least 1: {self}")
        if not 1 <= self.finetune_devices <= self.devices:
            raise ValueError(f"fine-tuning on {self.finetune_devices} devices needs 1..{self.devices} (the slots)")

    def demand(self, node: Node) -> tuple[int, int]:
        """(device slots, CPU slots) that `node` holds while it runs."""
        if node.gpu:
            return (self.finetune_devices if node.stage == "finetune" else 1), 0
        return (0, 1) if self.cpu else (1, 0)


@dataclass
class Finished:
    name: str
    ok: bool
    error: str | None = None
    manifest: dict | None = None
    bad_input: bool = False


class Executor(Protocol):
    def start(self, node: Node, devices: tuple[int, ...]) -> None:
        """Begin running `node` on `devices` (empty for a CPU slot)."""

    def wait(self) -> Finished:
        """Block until one started stage finishes."""

    def now(self) -> float:
        """Seconds since the executor was created."""


@dataclass
class Event:
    """One stage of a walk: where and when it ran, and how it ended."""
    name: str
    stage: str
    state: str                         # done | skipped | failed | blocked
    slot: str = ""                     # "gpu0", "gpu2+3", "cpu"; empty for skipped or blocked
    start: float | None = None
    end: float | None = None
    error: str | None = None
    bad_input: bool = False            # failed on bad input (exit code 64): re-running will not help
    manifest: dict | None = None       # the output's manifest, where it is done or skipped

    @property
    def seconds(self) -> float | None:
        return None if self.start is None or self.end is None else self.end - self.start


@dataclass
class Outcome:
    events: list[Event] = field(default_factory=list)
    manifests: dict[str, dict] = field(default_factory=dict)

    def of(self, state: str) -> list[Event]:
        return [e for e in self.events if e.state == state]

    @property
    def ok(self) -> bool:
        return not self.of("failed") and not self.of("blocked")

    @property
    def wall_s(self) -> float:
        ends = [e.end for e in self.events if e.end is not None]
        return max(ends, default=0.0)


def priorities(nodes: list[Node], cost: Callable[[Node], float] | None = None) -> dict[str, float]:
    """Each node's own cost plus the costliest chain of dependents below it (unit costs by default)."""
    cost = cost or (lambda n: 1.0)
    below: dict[str, list[str]] = {n.name: [] for n in nodes}
    for n in nodes:
        for d in n.deps:
            below.setdefault(d, []).append(n.name)
    by_name = {n.name: n for n in nodes}
    prio: dict[str, float] = {}
    for n in reversed(nodes):  # `nodes` is in dependency order: every dependent is done before its dependency
        prio[n.name] = cost(n) + max((prio[c] for c in below[n.name] if c in by_name), default=0.0)
    return prio


class _Slots:
    def __init__(self, capacity: Capacity, memory: Callable[[Node], float | None]):
        self.capacity, self.memory = capacity, memory
        self.free_devices = list(range(capacity.devices))
        self.free_cpu = capacity.cpu
        self.on: dict[int, list[Node]] = {d: [] for d in range(capacity.devices)}  # one-device stages running there

    def take(self, node: Node) -> tuple[int, ...] | None:
        devices, cpu = self.capacity.demand(node)
        if cpu > self.free_cpu:
            return None
        if devices <= len(self.free_devices):
            taken, self.free_devices = tuple(self.free_devices[:devices]), self.free_devices[devices:]
        else:
            shared = self._beside(node) if devices == 1 else None
            if shared is None:
                return None
            taken = (shared,)
        self.free_cpu -= cpu
        if devices == 1:
            self.on[taken[0]].append(node)
        return taken

    def _beside(self, node: Node) -> int | None:
        """A busy device that `node` fits beside (the one with the most memory left), or None."""
        cap, need = self.capacity, self.memory(node)
        if cap.share < 2 or not cap.device_gib or need is None:
            return None
        best, best_left = None, 0.0
        for d, running in self.on.items():
            peaks = [self.memory(n) for n in running]
            if not running or len(running) >= cap.share or any(p is None for p in peaks):
                continue
            left = cap.device_gib * FILL - sum(peaks) - need - CONTEXT_GIB * (len(running) + 1)
            if left >= 0 and (best is None or left > best_left):
                best, best_left = d, left
        return best

    def give(self, node: Node, devices: tuple[int, ...]) -> None:
        self.free_cpu += self.capacity.demand(node)[1]
        if len(devices) == 1:
            self.on[devices[0]].remove(node)
            if self.on[devices[0]]:
                return  # the device stays held by the stages beside it
        self.free_devices = sorted([*self.free_devices, *devices])


def slot_name(devices: tuple[int, ...]) -> str:
    return "gpu" + "+".join(map(str, devices)) if devices else "cpu"


def walk(nodes: list[Node], capacity: Capacity, executor: Executor, *,
         complete: Callable[[Node], dict | None] = lambda n: None,
         cost: Callable[[Node], float] | None = None,
         memory: Callable[[Node], float | None] = lambda n: None,
         on_event: Callable[[Event], None] = lambda e: None) -> Outcome:
    """Run `nodes` (in dependency order) by the rule above; `complete(node)` gives the manifest of an output that
    is already complete (checked when the node's dependencies are done), `memory(node)` its recorded peak device
    memory in GiB (None: unknown, never shares), `on_event` sees every start and end."""
    prio = priorities(nodes, cost)
    order = {n.name: i for i, n in enumerate(nodes)}
    waiting = sorted(nodes, key=lambda n: (-prio[n.name], order[n.name]))
    state: dict[str, str] = {}
    slots = _Slots(capacity, memory)
    running: dict[str, tuple[Node, tuple[int, ...], Event]] = {}
    outcome = Outcome()
    checked: set[str] = set()

    def end(event: Event) -> None:
        state[event.name] = event.state
        outcome.events.append(event)
        on_event(event)

    while waiting or running:
        changed = True
        while changed:  # a skipped or blocked stage frees its dependents at once
            changed = False
            for node in list(waiting):
                deps = [state.get(d) for d in node.deps if d in order]
                if any(s in ("failed", "blocked") for s in deps):
                    waiting.remove(node)
                    end(Event(node.name, node.stage, "blocked"))
                    changed = True
                    continue
                if any(s not in ("done", "skipped") for s in deps):
                    continue
                if node.name not in checked:  # once: reading a manifest may be a remote request
                    checked.add(node.name)
                    manifest = complete(node)
                else:
                    manifest = None
                if manifest is not None:
                    waiting.remove(node)
                    outcome.manifests[node.name] = manifest
                    t = executor.now()
                    end(Event(node.name, node.stage, "skipped", start=t, end=t, manifest=manifest))
                    changed = True
                    continue
                devices = slots.take(node)
                if devices is None:
                    continue
                waiting.remove(node)
                event = Event(node.name, node.stage, "running", slot_name(devices), start=executor.now())
                running[node.name] = (node, devices, event)
                on_event(event)
                executor.start(node, devices)
        if not running:
            break
        finished = executor.wait()
        node, devices, event = running.pop(finished.name)
        slots.give(node, devices)
        event.end = executor.now()
        event.state = "done" if finished.ok else "failed"
        event.error, event.bad_input, event.manifest = finished.error, finished.bad_input, finished.manifest
        if finished.manifest is not None:
            outcome.manifests[node.name] = finished.manifest
        end(event)
    return outcome


class Simulated:
    """An executor that runs nothing: each stage takes `duration(node)` seconds of a virtual clock (the planner;
    the scheduling tests, with `fail` naming stages that end in failure)."""

    def __init__(self, duration: Callable[[Node], float], fail: set[str] | None = None):
        self.duration, self.fail = duration, fail or set()
        self.clock = 0.0
        self._queue: list[tuple[float, int, str]] = []
        self._seq = 0
        self.running: set[str] = set()
        self.peak = 0

    def start(self, node: Node, devices: tuple[int, ...]) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (self.clock + self.duration(node), self._seq, node.name))
        self.running.add(node.name)
        self.peak = max(self.peak, len(self.running))

    def wait(self) -> Finished:
        self.clock, _, name = heapq.heappop(self._queue)
        self.running.discard(name)
        ok = name not in self.fail
        return Finished(name, ok, None if ok else "simulated failure")

    def now(self) -> float:
        return self.clock
