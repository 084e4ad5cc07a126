"""`python -m mysproj.pipeline.stage_process SPEC.json`: one stage of the local runner in its own process (under
torchrun for fine-tuning on several devices). SPEC holds the DAG node (`name`, `stage`, `config`); the config is
built exactly as the in-process runner builds it. It exits as every mysproj process does (`mysproj.process`): 0
done, 64 bad input, 143 preempted, anything else a crash; errors are printed redacted."""

from __future__ import annotations

import json
import sys

from mysproj.pipeline.dag import Node
from mysproj.process import run_stage
from mysproj.stages import registry


def main(argv: list[str]) -> int:
    with open(argv[0]) as f:
        spec = json.load(f)
    node = Node(spec["name"], spec["stage"], spec["config"])
    return run_stage(node.stage, lambda: registry.run(node.stage, registry.stage_config(node.stage, node.config)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
