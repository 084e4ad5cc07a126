"""Where full fine-tuning keeps its weights and optimizer state, decided from the card and the host memory actually
available, and the preflight that refuses, in one line, a run that cannot fit instead of being killed by the
kernel's OOM killer halfway through DeepSpeed's set-up. No torch import: a pure function, tested on CPU.

Host bytes of ZeRO-3 with `offload_optimizer: cpu` for N trainable parameters on one rank (DeepSpeed 0.19,
`runtime/zero/stage3.py`): fp32 master weights (`_create_fp32_partitions`, 4 B), AdamW's exp_avg and exp_avg_sq
(8 B), a fp32 `.grad` per sub-group that stays allocated with the optimizer offloaded (`initialize_optimizer_states`,
4 B) and the flat gradient-accumulation buffer in the model dtype (`grad_partitions_flat_buffer`, bf16: 2 B): 18 B a
parameter. AdamW's step (not foreach) makes two sub-group-sized fp32 temporaries. The two gradient buffers are the
pinned ones with `pin_memory`, and PyTorch's pinned-memory allocator rounds every block up to a power of two and
keeps freed blocks (CachingHostAllocator), hence `_pow2`. `offload_param: cpu` adds the bf16 parameters (2 B each for
all of them, pinned per tensor, then a flat pinned copy of the trainable ones). With both offloads pinned, 7B needs
~42 GiB anonymous + ~80 GiB pinned before Adam's 50 GiB arrive: what the OOM killer saw on a 128 GiB host.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

from mysproj.errors import BadInput
from mysproj.storage import uri as U
from mysproj.storage.manifest import StageInput

GIB = 2**30
FULL_BYTES_PER_PARAM = 16       # fp32 weights, grads and two Adam states on the card
FULL_HEADROOM = 20 * GIB        # frozen tower, activations at micro-batch 16 with checkpointing, allocator slack
HOST_BASE = 4 * GIB             # the process itself: torch + CUDA libraries, tokenized examples, loader workers
SUB_GROUP = 10**8               # optimizer-only offload: AdamW's temporaries stay ~0.8 GB (1e9 as shipped: 8 GB)
SHIPPED_SUB_GROUP = 10**9
LARGEST_TENSOR = 45 * 10**6    # a sub-group closes past SUB_GROUP elements, by up to one tensor (LLaMA-7B MLP)
MAX_LIVE = 10**9                # stage3_max_live_parameters: gathered bf16 parameters on the card
PIN_SHARE = 0.85                # pin only when everything (pinned or not) fits in this share of the host
PER_TENSOR_PIN_ROUNDING = 1.35  # per-tensor power-of-two rounding of LLaMA-7B's shapes (32, 90, 263 MB tensors)


@dataclass(frozen=True)
class HostMemory:
    bytes: int
    source: str  # where the figure came from, for the log and the refusal


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def host_memory(root: str = "/") -> HostMemory:
    """The memory this process may use: the container's cgroup limit (v2 `memory.max`, v1
    `memory.limit_in_bytes`) where it is set and below the machine's MemAvailable, else MemAvailable."""
    avail = None
    for line in (_read(os.path.join(root, "proc/meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    limit, source = None, None
    v2 = _read(os.path.join(root, "sys/fs/cgroup/memory.max"))
    v1 = _read(os.path.join(root, "sys/fs/cgroup/memory/memory.limit_in_bytes"))
    if v2 and v2 != "max":
        limit, source = int(v2), "the container's memory limit, cgroup memory.max"
    elif v1 and v1.isdigit() and int(v1) < 2**60:  # v1 writes a huge number for "no limit"
        limit, source = int(v1), "the container's memory limit, cgroup memory.limit_in_bytes"
    if limit is not None and (avail is None or limit <= avail):
        return HostMemory(limit, source)
    if avail is not None:
        return HostMemory(avail, "MemAvailable in /proc/meminfo")
    return HostMemory(0, "unknown: no cgroup limit, no /proc/meminfo")


def _pow2(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@dataclass(frozen=True)
class Plan:
    deepspeed: str | None   # None | zero2 | zero3 | zero3-offload
    offload_param: bool = False
    pin_memory: bool = False
    sub_group_size: int | None = None
    gpu_need: int = 0       # bytes; 0 = not estimated (no GPU, or a strategy that trains little)
    host_need: int = 0
    gpu_bytes: int = 0
    host_bytes: int = 0
    host_source: str = ""

    def summary(self) -> dict:
        """The manifest's record: sizes in GiB."""
        gib = ("gpu_need", "host_need", "gpu_bytes", "host_bytes")
        out = {k: v for k, v in asdict(self).items() if k not in gib}
        out.update({k.removesuffix("_bytes") + "_gib": round(getattr(self, k) / GIB, 1) if getattr(self, k)
                    else None for k in gib})
        return out

    def describe(self) -> str:
        ds = self.deepspeed or "off"
        if self.deepspeed == "zero3-offload":
            ds += f" ({'optimizer and parameters' if self.offload_param else 'optimizer only'}, " \
                  f"{'pinned' if self.pin_memory else 'not pinned'})"
        if not self.gpu_need:
            return f"deepspeed {ds}; {self.gpu_bytes / GIB:.1f} GiB GPU, {self.host_bytes / GIB:.1f} GiB host " \
                   f"({self.host_source}); not estimated here (full fine-tuning on one GPU only)"
        return (f"deepspeed {ds}; needs {self.gpu_need / GIB:.1f} of {self.gpu_bytes / GIB:.1f} GiB GPU, "
                f"{self.host_need / GIB:.1f} of {self.host_bytes / GIB:.1f} GiB host ({self.host_source})")


def gpu_need(trainable: int, total: int, offload: str | None) -> int:
    """Bytes on one card: None = everything on it (fp32 trained weights, grads, Adam; bf16 frozen); `optimizer` =
    bf16 parameters + gathered ones; `all` = only the gathered parameters."""
    gathered = 2 * min(total, MAX_LIVE)
    if offload is None:
        return FULL_BYTES_PER_PARAM * trainable + 2 * (total - trainable) + FULL_HEADROOM
    if offload == "optimizer":
        return 2 * total + gathered + FULL_HEADROOM
    return gathered + FULL_HEADROOM


def host_need(trainable: int, total: int, offload_param: bool, pin: bool, sub_group: int) -> int:
    """Peak host bytes of ZeRO-3 with the optimizer offloaded (see the module docstring): the larger of the
    loaded bf16 model (before DeepSpeed moves it) and the offloaded state."""
    groups = math.ceil(trainable / sub_group)
    fp32_grads = groups * _pow2(4 * (sub_group + LARGEST_TENSOR)) if pin else 4 * trainable
    accum = _pow2(2 * trainable) if pin else 2 * trainable
    need = 12 * trainable + fp32_grads + accum + 2 * 4 * min(sub_group, trainable)
    if offload_param:
        need += int(2 * total * (PER_TENSOR_PIN_ROUNDING if pin else 1)) + (_pow2(2 * trainable) if pin else 0)
    return HOST_BASE + max(2 * total, need)


def resolve_deepspeed(choice: str, strategy: str, cuda: bool, world: int, gpu_bytes: int = 0,
                      llm_params: int = 0) -> str | None:
    """The DeepSpeed config to use, or None. `auto` uses DeepSpeed on GPUs only; naming a stage also works on
    CPUs (DeepSpeed's CPU accelerator), which is how the tests run this code path."""
    if choice != "auto":
        return None if choice == "none" else choice
    if not cuda:
        return None
    if strategy == "projector":
        return "zero2" if world > 1 else None
    if world > 1:
        return "zero3"
    if strategy != "full":
        return None
    # Full fine-tuning keeps fp32 master weights, fp32 grads and two fp32 Adam states (16 bytes a parameter) plus
    # checkpointed activations: 7B fits a 141 GB card but not an 80 GB one, which offloads (memory_fit.plan: what).
    return None if FULL_BYTES_PER_PARAM * llm_params + FULL_HEADROOM <= gpu_bytes else "zero3-offload"


def plan(*, trainable: int, total: int, gpu_bytes: int, host: HostMemory, world: int, strategy: str,
         requested: str, cuda: bool) -> Plan:
    """The DeepSpeed config, offloads and pinning of a run. Only full fine-tuning on one card that cannot hold its
    fp32 state offloads: the optimizer only where the card holds the bf16 parameters, pinned only where
    everything fits in PIN_SHARE of the host (pinned pages cannot be swapped or reclaimed), else not pinned.
    `requested` other than auto is kept (`zero3-offload` offloads both, as the released code's config)."""
    name = resolve_deepspeed(requested, strategy, cuda, world, gpu_bytes=gpu_bytes, llm_params=trainable)
    base = dict(gpu_bytes=gpu_bytes, host_bytes=host.bytes, host_source=host.source)
    if not cuda or strategy != "full" or world > 1 or name not in (None, "zero3-offload"):
        return Plan(name, **base)
    if name is None:
        return Plan(None, gpu_need=gpu_need(trainable, total, None), host_need=HOST_BASE + 2 * total, **base)
    both = requested == "zero3-offload" or gpu_need(trainable, total, "optimizer") > gpu_bytes
    sub_group = SHIPPED_SUB_GROUP if requested == "zero3-offload" else SUB_GROUP
    gpu = gpu_need(trainable, total, "all" if both else "optimizer")
    pinned = host_need(trainable, total, both, True, sub_group)
    pin = pinned <= PIN_SHARE * host.bytes
    return Plan("zero3-offload", offload_param=both, pin_memory=pin,
                sub_group_size=None if sub_group == SHIPPED_SUB_GROUP else sub_group, gpu_need=gpu,
                host_need=pinned if pin else host_need(trainable, total, both, False, sub_group), **base)


def apply(ds_cfg: dict, p: Plan) -> dict:
    """The offloads and pinning of `p` written into a filled `zero3-offload` DeepSpeed config."""
    zero = ds_cfg["zero_optimization"]
    zero["offload_optimizer"]["pin_memory"] = p.pin_memory
    if p.offload_param:
        zero["offload_param"]["pin_memory"] = p.pin_memory
    else:
        zero.pop("offload_param", None)
    if p.sub_group_size:
        zero["sub_group_size"] = p.sub_group_size
    return ds_cfg


def check(p: Plan) -> None:
    """BadInput (one line) where the plan cannot fit: what it needs, what there is, what to change."""
    gpu_short = p.gpu_need > p.gpu_bytes
    host_short = p.host_need > p.host_bytes
    if not (gpu_short or host_short):
        return
    short, fixes = [], []
    if gpu_short:
        short.append(f"{_gib(p.gpu_need)} GiB GPU memory, the card has {p.gpu_bytes / GIB:.0f} GiB")
        fixes.append("--deepspeed auto (offloads to the host)" if p.deepspeed != "zero3-offload"
                     else "a card with more memory")
    if host_short:
        short.append(f"{_gib(p.host_need)} GiB host memory, {p.host_bytes / GIB:.0f} GiB available "
                     f"({p.host_source})")
        fixes.append(f"more host memory (chart finetune.resources.limits.memory: {_gib(p.host_need)}Gi or more)")
    raise BadInput(f"finetune: full fine-tuning with deepspeed {p.deepspeed or 'none'} on one GPU needs "
                   f"{'; and '.join(short)}: use {', or '.join(fixes)}, or 2 GPUs (ZeRO-3, no offload), "
                   f"or --strategy lora")


def _gib(n: int) -> int:
    return math.ceil(n / GIB)


def _llama_params(t: dict) -> int:
    h, inter, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    kv = h // t.get("num_attention_heads", 1) * t.get("num_key_value_heads", t.get("num_attention_heads", 1))
    embed = t["vocab_size"] * h * (1 if t.get("tie_word_embeddings") else 2)
    return embed + layers * (2 * h * h + 2 * h * kv + 3 * h * inter + 2 * h) + h


def _clip_params(v: dict) -> int:
    d, inter, layers, p = v["hidden_size"], v["intermediate_size"], v["num_hidden_layers"], v["patch_size"]
    embed = 3 * p * p * d + d + ((v["image_size"] // p) ** 2 + 1) * d
    return embed + layers * (4 * (d * d + d) + 2 * d * inter + inter + d + 4 * d) + 4 * d


def params_from_config(config: dict) -> tuple[int, int]:
    """(trainable by full fine-tuning: LLM + projector, all parameters) of a LLaVA `config.json` (HF layout, or
    the original one, whose vision tower lives elsewhere and counts as CLIP ViT-L/14-336)."""
    text = config.get("text_config") or config
    vision = config.get("vision_config") or {"hidden_size": config.get("mm_hidden_size", 1024),
                                             "intermediate_size": 4096, "num_hidden_layers": 24, "patch_size": 14,
                                             "image_size": 336}
    h, mm = text["hidden_size"], vision["hidden_size"]
    trainable = _llama_params(text) + mm * h + h + h * h + h  # mlp2x_gelu projector
    return trainable, trainable + _clip_params(vision)


def model_params(uri: str) -> tuple[int, int] | None:
    """`params_from_config` of the model at `uri` from its config.json alone, before any weight is read; None
    where it cannot be read that way (the check after loading still runs)."""

    try:
        inp = StageInput.if_complete(str(uri).rstrip("/"))
        path = inp.local_path("config.json") if inp is not None and "config.json" in inp.files else None
        config = json.load(open(path)) if path else json.loads(U.read_text(U.join(str(uri), "config.json")))
        return params_from_config(config)
    except Exception:  # noqa: BLE001 - best effort: the same check runs on the loaded model
        return None
