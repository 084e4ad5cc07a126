"""`mysproj bench weights`: how fast a model's weights move between a bucket and this machine, as the stages move
them: written by `model init` (concurrent multipart uploads), read as concurrent ranged GETs into host memory, and
into pinned host memory and on to the GPU, each verified per part against the manifest; and the same GETs without
verification, to tell the hashing's share; beside raw loopback TCP over as many connections, the bound of any
server on this machine. GB/s of the weights' bytes; one JSON line per measurement, a table last.

    mysproj bench weights --preset llava-1.5-7b                  # a SeaweedFS server on loopback, under --work
    mysproj bench weights --preset tiny --device cpu              # seconds, on a laptop
    MYSPROJ_S3_CONNECTIONS=32 MYSPROJ_S3_PART_MIB=32 mysproj bench weights --bucket s3://my-bucket/bench
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import threading
import time

from mysproj.bench.s3_server import seaweedfs
from mysproj.errors import BadInput
from mysproj.stages.registry import run, stage_config
from mysproj.storage import s3_transfer, write_text
from mysproj.storage.manifest import StageInput
from mysproj.storage.s3_transfer import TransferSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=("tiny", "llava-1.5-7b"), default="llava-1.5-7b",
                   help="random-weight LLaVA preset written to the bucket")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda when available")
    p.add_argument("--repeat", type=int, default=2, help="reads of each kind (the first also warms the server)")
    p.add_argument("--bucket", default=None, help="an existing bucket URI, reached with the environment's endpoint "
                                                  "and credentials (default: a SeaweedFS server on loopback)")
    p.add_argument("--work", default="./runs/bench-weights", help="local folder of the server's data (removed "
                                                                   "afterwards)")
    p.add_argument("--json-out", default=None, help="the results as JSON")
    p.set_defaults(func=run_command)


def _line(kind: str, nbytes: int, seconds: float, **facts) -> dict:
    row = {"measure": kind, "GB": round(nbytes / 1e9, 3), "seconds": round(seconds, 3),
           "GB_per_s": round(nbytes / 1e9 / max(seconds, 1e-9), 3), **facts}
    print(json.dumps(row), flush=True)
    return row


def _raw_reads(inp, names: list[str]) -> tuple[int, float]:
    """The same ranged GETs into host memory, unverified."""
    import torch  # noqa: PLC0415 - torch: only once the benchmark runs (the CLI imports this module for its arguments)

    total, t0 = 0, time.perf_counter()
    for name in names:
        size = int(inp.files[name]["size"])
        s3_transfer.read_into(inp.path(name), torch.empty(size, dtype=torch.uint8).numpy())
        total += size
    return total, time.perf_counter() - t0


def loopback(nbytes: int, connections: int) -> tuple[int, float]:
    """Bytes over `connections` loopback TCP connections at once, sender to receiver's memory: what the machine's
    loopback allows the S3 server and this client, whatever either does."""

    listener = socket.create_server(("127.0.0.1", 0))
    port, each = listener.getsockname()[1], nbytes // connections
    block = memoryview(bytes(8 << 20))

    def serve() -> None:
        for _ in range(connections):
            conn, _ = listener.accept()
            threading.Thread(target=send, args=(conn,), daemon=True).start()

    def send(conn) -> None:
        with conn:
            left = each
            while left:
                left -= conn.send(block[:min(left, len(block))])

    def receive(into: memoryview) -> None:
        with socket.create_connection(("127.0.0.1", port)) as c:
            got = 0
            while got < len(into):
                n = c.recv_into(into[got:])
                if not n:
                    raise ConnectionError("loopback sender stopped early")
                got += n

    threading.Thread(target=serve, daemon=True).start()
    buffers = [memoryview(bytearray(each)) for _ in range(connections)]
    t0 = time.perf_counter()
    workers = [threading.Thread(target=receive, args=(b,)) for b in buffers]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    listener.close()
    return each * connections, time.perf_counter() - t0


def measure(bucket: str, preset: str, device: str, repeat: int) -> list[dict]:
    import torch  # noqa: PLC0415 - torch: only once the benchmark runs (the CLI imports this module for its arguments)

    from mysproj.models.loading import load_llava  # noqa: PLC0415 - torch side: only once the benchmark runs (the CLI imports this module for its arguments)
    from mysproj.models.stream_load import read_state_dict  # noqa: PLC0415 - torch side: only once the benchmark runs (the CLI imports this module for its arguments)

    uri = f"{bucket.rstrip('/')}/models/{preset}"
    settings = TransferSettings.from_env()
    facts = {"connections": settings.connections, "part_MiB": settings.part_bytes / 1024**2}
    manifest = run("model-init", stage_config("model-init", {"preset": preset, "out": uri},
                                              env=os.environ))
    inp = StageInput(uri)
    names = sorted(n for n in inp.files if n.endswith(".safetensors"))
    nbytes = sum(int(inp.files[n]["size"]) for n in names)
    rows = [_line("loopback TCP (the bound of a server on this machine)",
                  *loopback(min(max(nbytes, 256 << 20), 8 << 30), settings.connections), **facts),
            _line("upload (model init, multipart)", nbytes, manifest["summary"]["time"]["transfer_out_s"], **facts)]
    for _ in range(repeat):
        rows.append(_line("bucket -> host memory, unverified", *_raw_reads(inp, names), **facts))
    for _ in range(repeat):
        state, stats = read_state_dict(inp, names, device="cpu")
        del state
        rows.append(_line("bucket -> host memory, verified", stats["bytes"], stats["seconds"], **facts))
    if device == "cuda":
        for _ in range(repeat):
            torch.cuda.synchronize()
            state, stats = read_state_dict(inp, names, device="cuda")
            torch.cuda.synchronize()
            del state
            torch.cuda.empty_cache()
            rows.append(_line("bucket -> pinned host -> GPU, verified", stats["bytes"], stats["seconds"], **facts))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model = load_llava(uri, device="cuda").model
        torch.cuda.synchronize()
        rows.append(_line("load_llava onto the GPU (whole model)", nbytes, time.perf_counter() - t0,
                          on=str(next(model.parameters()).device), **facts))
        del model
    return rows


def run_command(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415 - torch: only once the benchmark runs (the CLI imports this module for its arguments)

    if args.repeat < 1:
        raise BadInput("--repeat must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    work = os.path.abspath(args.work)
    with contextlib.ExitStack() as stack:
        if args.bucket:
            bucket = args.bucket
        else:
            bucket = stack.enter_context(seaweedfs(os.path.join(work, "seaweedfs"), "mysproj-bench-weights"))
            stack.callback(shutil.rmtree, work, ignore_errors=True)
        rows = measure(bucket, args.preset, device, args.repeat)
    width = max(len(r["measure"]) for r in rows)
    print(f"bench weights | {args.preset} | {device} | {rows[0]['connections']} connections, "
          f"{rows[0]['part_MiB']:g} MiB parts")
    for r in rows:
        print(f"{r['measure'].ljust(width)}  {r['GB']:8.2f} GB  {r['seconds']:8.2f} s  {r['GB_per_s']:7.2f} GB/s")
    if args.json_out:
        write_text(args.json_out, json.dumps({"bench": "weights", "preset": args.preset, "device": device,
                                              "rows": rows}, indent=2) + "\n")
    return 0
