"""`mysproj bench pipeline --dataset-shape dtd`: the whole job a user runs, timed stage by stage.

It writes the dataset's fixture in its real layout and size (`mysproj.data.shapes`; reused by later runs), then
runs `mysproj run`'s own runner on it: random-weight presets, one seed, fine-tuning projector and full without
resumable checkpoints, on every visible GPU (`--gpus`). Each stage's start and end go to the log file as JSON
lines the moment they happen, so a run cut short still leaves its numbers; the per-stage table and the total are
printed last and written as JSON, in the format `mysproj run --plan --stage-times FILE` reads.

    mysproj bench pipeline --dataset-shape dtd                              # the DTD job, every GPU
    mysproj bench pipeline --dataset-shape dtd --gpus 1
    mysproj bench pipeline --model-preset tiny --classes 3 --per-class 6 \\
        --set finetune.max_steps=2                                          # the same command, seconds on a CPU
    mysproj bench pipeline --dataset-shape dtd --gpus 1 --weights-in s3     # every stage output in a bucket
    mysproj bench pipeline --dataset-shape dtd --strategies full --no-zero-shot   # a half, within a time limit

`--weights-in s3` puts the run root (every stage output: the models, their fine-tunes and merges, and the rest)
in a bucket, as a user's run on Kubernetes has it; the fixture's raw dataset stays on local disk. Without
`--bucket`, a SeaweedFS server (`mysproj.bench.s3_server`) is started on loopback for the run, storing under
`<work>/seaweedfs`. Each stage's `time` then splits into input transfer, compute and output transfer.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import time

from mysproj.bench.s3_server import seaweedfs
from mysproj.config.fields import load_config
from mysproj.config.registry import summary_of
from mysproj.data.shapes import SHAPES, write_dataset
from mysproj.errors import BadInput
from mysproj.pipeline import local, plan, stage_times
from mysproj.pipeline.command import add_share_arguments, share_options
from mysproj.pipeline.dag import PipelineConfig
from mysproj.storage import join, remove, write_text

log = logging.getLogger("mysproj.bench")
CLIP_FOR = {"llava-1.5-7b": "clip-vit-l-14-336", "tiny": "clip-tiny"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset-shape", choices=sorted(SHAPES), default="dtd",
                   help="dataset whose layout, class names, split sizes and image sizes the fixture has")
    p.add_argument("--classes", type=int, default=None, help="only the first N classes (default: all)")
    p.add_argument("--per-class", type=int, default=None,
                   help="images per class over all splits, in the real split proportions (default: real sizes)")
    p.add_argument("--model-preset", choices=sorted(CLIP_FOR), default="llava-1.5-7b",
                   help="random-weight LLaVA preset (the CLIP preset follows: clip-vit-l-14-336 or clip-tiny)")
    p.add_argument("--strategies", default="projector,full", help="fine-tuning strategies, comma-separated")
    p.add_argument("--eval-mode", choices=("generate", "scoring"), default="generate")
    p.add_argument("--zero-shot", action=argparse.BooleanOptionalAction, default=True,
                   help="the zero-shot evaluations (CLIP and LLaVA); --no-zero-shot times the fine-tuned half alone")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gpus", type=int, default=None, help="device slots (default: every visible GPU, 1 on a CPU)")
    p.add_argument("--finetune-gpus", type=int, default=1, help="device slots one fine-tuning run takes")
    add_share_arguments(p)
    p.add_argument("--stage-times", action="append", default=None, metavar="SOURCE",
                   help="recorded stage times (a run root or an earlier bench JSON of the same card): the runner's "
                        "priorities and, with --share-gpu, each stage's memory; repeatable")
    p.add_argument("--work", default="./runs/bench-pipeline",
                   help="folder of the fixture (data/, kept) and the run (run/, emptied first unless --resume)")
    p.add_argument("--resume", action="store_true", help="keep the stages a previous run of the same job finished")
    p.add_argument("--set", action="append", default=[], metavar="STAGE.FIELD=VALUE",
                   help="a stage config field for every stage of that kind, e.g. finetune.max_steps=2; repeatable")
    p.add_argument("--log", default=None, help="JSON lines, one per stage start and end (default: <work>/bench.log)")
    p.add_argument("--json-out", default=None, help="the results as JSON (default: <work>/bench.json)")
    p.add_argument("--weights-in", choices=("local", "s3"), default="local",
                   help="where the run root (every model and other stage output) lives: local disk, or a bucket")
    p.add_argument("--bucket", default=None, help="with --weights-in s3: an existing bucket URI, reached with the "
                                                  "environment's endpoint and credentials (default: a SeaweedFS "
                                                  "server on loopback for the run, under <work>/seaweedfs)")
    p.add_argument("--fixture-workers", type=int, default=None, help="processes writing the fixture (default: all "
                                                                      "cores)")
    p.set_defaults(func=run_command)


def overrides(sets: list[str], seed_overrides: dict) -> dict:
    """{stage: {field: value}} from STAGE.FIELD=VALUE items, on top of `seed_overrides`."""
    out = {stage: dict(fields) for stage, fields in seed_overrides.items()}
    for item in sets:
        key, sep, value = item.partition("=")
        stage, dot, field = key.partition(".")
        if not (sep and dot and stage and field):
            raise BadInput(f"--set {item!r}: expected STAGE.FIELD=VALUE, e.g. finetune.max_steps=2")
        out.setdefault(stage.strip(), {})[field.strip().replace("-", "_")] = value
    return out


def fixture(args, work: str) -> tuple[str, dict]:
    """The fixture's prep source URI (written unless a complete one with the same parameters is there) and its
    description."""

    shape = SHAPES[args.dataset_shape]
    desc = {"dataset": shape.dataset, "classes": len(shape.counts(args.classes, args.per_class)["train"]),
            "per_class": args.per_class, "seed": args.seed,
            "images": {s: sum(c.values()) for s, c in shape.counts(args.classes, args.per_class).items()}}
    folder = os.path.join(work, "data", f"{shape.dataset}-c{desc['classes']}-p{args.per_class or 'real'}")
    marker = os.path.join(folder, "_FIXTURE.json")
    if os.path.exists(marker):
        with open(marker) as f:
            done = json.load(f)
        if done.get("desc") == desc:
            return done["source"], desc
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.monotonic()
    source = write_dataset(shape, folder, classes=args.classes, per_class=args.per_class,
                           workers=args.fixture_workers, seed=args.seed)
    log.info("bench pipeline: wrote the %s fixture (%s) in %.0f s", shape.dataset,
             ", ".join(f"{n} {s}" for s, n in desc["images"].items()), time.monotonic() - t0)
    with open(marker, "w") as f:  # last: a cut-short write is redone
        json.dump({"desc": desc, "source": source}, f)
    return source, desc


def pipeline_config(args, root: str, source: str):
    shape = SHAPES[args.dataset_shape]
    ds = shape.dataset
    # as a user's run with the resumable checkpoints of a 7B full fine-tune (fp32 weights and Adam state) switched off
    given = {"finetune": {"save_checkpoints": False}}
    if ds == "crisismmd":  # prep keeps the paper's four classes unless told which ones the fixture has
        given["prep"] = {"crisismmd_classes": list(shape.counts(args.classes, args.per_class)["train"])}
    return load_config(PipelineConfig, env={}, overrides={
        "root": root, "datasets": [ds], "sources": {ds: source}, "seeds": [args.seed],
        "strategies": [s.strip() for s in args.strategies.split(",") if s.strip()],
        "model_preset": args.model_preset, "clip_preset": CLIP_FOR[args.model_preset], "eval_mode": args.eval_mode,
        "zero_shot": args.zero_shot,
        "overrides": overrides(args.set, given)})


class EventLog:
    """Appends one JSON line per stage start and end to `path`, at once; an end line carries the stage's `time`
    and `processed` entries from its manifest."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path

    def begin(self, **facts) -> None:
        """A first line saying which job the lines after it belong to (the file is appended to, run after run)."""
        self._write({"t": round(time.time(), 3), "state": "begin", **facts})

    def _write(self, line: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(line, default=str) + "\n")

    def __call__(self, e) -> None:
        line = {"t": round(time.time(), 3), "name": e.name, "stage": e.stage, "state": e.state, "slot": e.slot,
                "start_s": e.start, "end_s": e.end, "wall_s": e.seconds, "error": e.error}
        if e.state == "done":
            summary = summary_of(e.manifest)
            line.update(time=summary.time or None, processed=summary.processed)
        self._write(line)


def rows(outcome, root: str) -> list[dict]:
    out = []
    for e in sorted(outcome.events, key=lambda e: (e.start is None, e.start or 0.0)):
        m = outcome.manifests.get(e.name) or {}
        summary = summary_of(m)
        out.append({"name": e.name, "stage": e.stage, "state": e.state, "slot": e.slot, "start_s": e.start,
                    "wall_s": e.seconds, "stage_time": summary.time or None, "processed": summary.processed,
                    "out": join(root, e.name)})
    return out


def table(result: dict) -> str:
    head = ["stage output", "slot", "start s", "wall s", "in stage s", "in s", "compute s", "out s", "GPU-s",
            "GPU GiB", "throughput"]
    body = []
    for r in result["rows"]:
        t = r["stage_time"] or {}
        rate = f"{t['throughput']:.2f} {t['unit']}" if t.get("throughput") else "-"
        wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
        body.append([f"{r['name']} ({r['state']})" if r["state"] != "done" else r["name"], r["slot"] or "-",
                     "-" if r["start_s"] is None else f"{r['start_s']:.1f}", wall,
                     f"{t['wall_s']:.1f}" if t else "-",
                     *(f"{t[k]:.1f}" if t.get(k) is not None else "-"
                       for k in ("transfer_in_s", "compute_s", "transfer_out_s")),
                     f"{t['gpu_s']:.1f}" if t else "-",
                     f"{t['gpu_memory_gib']:.1f}" if t.get("gpu_memory_gib") is not None else "-", rate])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    total = result["total"]
    images = " / ".join(f"{n} {split}" for split, n in result["fixture"]["images"].items())
    lines = [f"bench pipeline | {result['dataset_shape']}: {result['fixture']['classes']} classes, {images} | "
             f"{result['model_preset']} | {result['card']} | {result['gpus']} device slot(s) | weights in "
             f"{result.get('weights_in', 'local')}"]
    lines += ["  ".join(c.ljust(w) for c, w in zip(x, widths)) for x in [head, *body]]
    lines.append(f"total: {total['wall_s']:.1f} s wall ({total['wall_s'] / 60:.1f} min), {total['gpu_s']:.1f} "
                 f"GPU-seconds, {total['stages']} stages ({total['failed']} failed, {total['blocked']} not run)")
    return "\n".join(lines)


def run_command(args: argparse.Namespace) -> int:
    for flag in ("classes", "per_class", "gpus", "finetune_gpus"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise BadInput(f"--{flag.replace('_', '-')} must be >= 1")
    work = os.path.abspath(args.work)
    source, desc = fixture(args, work)
    with contextlib.ExitStack() as stack:
        root = os.path.join(work, "run")
        if args.weights_in == "s3":
            root = join(args.bucket or stack.enter_context(seaweedfs(os.path.join(work, "seaweedfs"), "mysproj-bench")),
                        "run")
        if not args.resume:
            remove(root, recursive=True)
        return _run(args, work, root, source, desc)


def _run(args, work: str, root: str, source: str, desc: dict) -> int:
    from mysproj.bench.measurement import card_name  # noqa: PLC0415 - torch side: the card's name, once the run is done

    cfg = pipeline_config(args, root, source)
    gpus = args.gpus if args.gpus is not None else max(1, local.visible_gpus())
    events = EventLog(args.log or os.path.join(work, "bench.log"))
    recorded = stage_times.load(args.stage_times) if args.stage_times else None
    cap, memory = share_options(args, gpus, args.finetune_gpus, recorded)
    events.begin(dataset_shape=args.dataset_shape, fixture=desc, model_preset=args.model_preset, gpus=gpus,
                 finetune_gpus=args.finetune_gpus, share_gpu=cap.share, strategies=args.strategies, set=args.set)
    cost = plan.stage_cost(cfg, cap, recorded) if recorded is not None else None
    outcome = local.run(cfg, gpus=gpus, finetune_gpus=args.finetune_gpus, share=cap.share, device_gib=cap.device_gib,
                        cost=cost, memory=memory, on_event=events)

    # Named only now: asking CUDA for it would keep a context on the first GPU beside the stage running there.
    card = card_name("cuda" if local.visible_gpus() else "cpu")
    result_rows = rows(outcome, root)
    # A stage kept by --resume counts with the time its manifest recorded when it ran.
    times = stage_times.summarise([(r["name"], outcome.manifests[r["name"]], r["wall_s"] if r["state"] == "done"
                                    else None) for r in result_rows if r["state"] in ("done", "skipped")])
    result = {**times.as_json(), "bench": "pipeline", "dataset_shape": args.dataset_shape, "fixture": desc,
              "model_preset": args.model_preset, "card": card, "weights_in": args.weights_in,
              "gpus": gpus, "finetune_gpus": args.finetune_gpus, "share_gpu": cap.share, "device_gib": cap.device_gib,
              "root": root, "rows": result_rows,
              "total": {"wall_s": outcome.wall_s, "stages": len(outcome.events),
                        "gpu_s": sum((r["stage_time"] or {}).get("gpu_s") or 0.0 for r in result_rows),
                        "failed": len(outcome.of("failed")), "blocked": len(outcome.of("blocked"))}}
    json_out = args.json_out or os.path.join(work, "bench.json")
    write_text(json_out, json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    print(f"bench pipeline: results {json_out}, stage log {events.path}")
    return local.exit_code(outcome)
