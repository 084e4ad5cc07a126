"""The paper's classification prompt (docs/paper.md), with the class order re-shuffled for every example.

The released script ends the prompt with "\\n\\nOutput:"; the paper's text (Sec. 2) does not. `style="paper"` (the
default) follows the paper, `style="code"` the script.
"""

from __future__ import annotations

import random

PROMPT_STYLES = ("paper", "code")
_CODE_SUFFIX = "\n\nOutput:"


def classes_string(classes: list[str], rng: random.Random) -> str:
    """Classes in a fresh random order, each in double quotes, joined with ', ' (as the released script)."""
    order = list(classes)
    rng.shuffle(order)
    return ", ".join(f'"{c}"' for c in order)


def classification_prompt(task: str, classes: list[str], rng: random.Random, style: str = "paper") -> str:
    if style not in PROMPT_STYLES:
        raise ValueError(f"style must be one of {PROMPT_STYLES}, got {style!r}")
    text = (f"<image>\nClassify this image into one of the following categories relating to {task}: "
            f"{classes_string(classes, rng)}. Only output a single final classification label and NOTHING ELSE.")
    return text + (_CODE_SUFFIX if style == "code" else "")


def split_rng(seed: int, split: str) -> random.Random:
    """One generator per split, so the test prompts do not change when the train set does."""
    return random.Random(f"mysproj-prompt:{seed}:{split}")


def llava_records(samples, classes: list[str], task: str, rng: random.Random, style: str = "paper") -> list[dict]:
    """The released code's fine-tuning JSON records: 9-digit zero-padded ids, one human and one gpt turn each."""
    return [{"id": f"{i:09d}", "image": s.image,
             "conversations": [{"from": "human", "value": classification_prompt(task, classes, rng, style)},
                               {"from": "gpt", "value": s.label}]}
            for i, s in enumerate(samples)]
