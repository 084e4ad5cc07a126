"""`python -m mysproj.pipeline.stage_process SPEC.json`: one stage of the local runner in its own process (under
torchrun for fine-tuning on several devices). SPEC holds the DAG node (`name`, `stage`, `config`); the config is
built exactly as the in-process runner builds it. Exit codes are a stage Job's (`mysproj.kube.entry.run_job`): 0
done, 64 bad input, 143 preempted, anything else a crash; errors are printed redacted."""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from mysproj.kube.entry import run_job
    from mysproj.pipeline.dag import Node
    from mysproj.stages import registry

    with open(argv[0]) as f:
        spec = json.load(f)
    node = Node(spec["name"], spec["stage"], spec["config"])
    return run_job(node.stage, lambda: registry.run(node.stage, registry.stage_config(node.stage, node.config)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
