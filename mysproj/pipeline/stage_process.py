"""`python -m mysproj.pipeline.stage_process SPEC.json`: one stage of the local runner in its own process (under
torchrun for fine-tuning on several devices). SPEC holds the DAG node (`name`, `stage`, `config`); the config is
built exactly as the in-process runner builds it. Exit 0 done, 64 bad input, anything else a crash."""

from __future__ import annotations

import json
import sys

from mysproj.errors import EXIT_BAD_INPUT, BadInput


def main(argv: list[str]) -> int:
    from mysproj.cli import setup_logging
    from mysproj.pipeline.dag import Node
    from mysproj.stages import registry

    setup_logging()
    with open(argv[0]) as f:
        spec = json.load(f)
    node = Node(spec["name"], spec["stage"], spec["config"])
    try:
        registry.run(node.stage, registry.stage_config(node.stage, node.config))
    except BadInput as e:
        print(f"error: {node.name}: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
