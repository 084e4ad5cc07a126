"""The pipeline's `recipe`: where the paper's text and the released code disagree, which one the stages follow.

`paper` (the default) follows the paper's text; `released` follows the released scripts as shipped (docs/recipe.md,
docs/paper.md). Each choice is an ordinary stage field: the recipe only sets its value in the DAG, and
`pipeline.overrides` still override any one of them. Where the source shows what the paper's own runs did (no
gradient clipping, the HF Trainer's loss, the vicuna_v1 training prompt, tokenizer_image_token) both recipes do
it, and the fields say so, so a report can name every departure. No ML imports: the controller reads this.
"""

from __future__ import annotations

from dataclasses import dataclass

RECIPES = ("paper", "released")


@dataclass(frozen=True)
class Choice:
    label: str               # what the report calls it
    stage: str
    field: str
    paper: object
    released: object
    strategy: str | None = None  # finetune fields that differ for one strategy only

    def value(self, recipe: str):
        return self.paper if recipe == "paper" else self.released


CHOICES = (
    Choice("conversation", "finetune", "conv", "v1", "plain", strategy="projector"),
    Choice("training images", "finetune", "image_aspect_ratio", "pad", "square", strategy="projector"),
    Choice("micro-batch cap", "finetune", "max_micro_batch", 16, 32, strategy="projector"),
    Choice("last step", "finetune", "fill", "masked", "repeat"),
    Choice("length grouping", "finetune", "group_by_length", False, True, strategy="full"),
    Choice("prompt ending", "prep", "prompt_style", "paper", "code"),
    Choice("label rule", "prep", "label_underscores", "space", "delete"),
    Choice("probe protocol", "probe", "protocol", "paper", "code"),
    Choice("training image processor", "finetune", "image_backend", "torchvision", "pil"),
    Choice("image processor", "eval-llava", "image_backend", "torchvision", "pil"),
    Choice("image processor", "probe", "image_backend", "torchvision", "pil"),
    Choice("decoding temperature", "eval-llava", "temperature", 0.0, 0.2),
    Choice("max new tokens", "eval-llava", "max_new_tokens", 32, 512),
    # The same in both: what the released scripts did, which the paper's "default hyper-parameters" were.
    # Table 3's headline vector (both are probed): A.3's "image embeddings", and the one pooled vector per image
    # the released probe script reads.
    Choice("pre-projection headline", "probe", "pre_pooling", "cls", "cls"),
    Choice("gradient clipping", "finetune", "max_grad_norm", 0.0, 0.0),
    Choice("loss normalisation", "finetune", "loss_normalization", "micro-batch", "micro-batch"),
    Choice("eval mode", "eval-llava", "mode", "generate", "generate"),
)


def stage_fields(recipe: str, stage: str, strategy: str | None = None) -> dict:
    """The field values `recipe` sets in one stage's config (a finetune node also by its strategy)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, not {recipe!r}")
    return {c.field: c.value(recipe) for c in applicable(stage, strategy)}


def applicable(stage: str, strategy: str | None = None) -> list[Choice]:
    """The choices that apply to one stage run (finetune choices of another strategy keep their default)."""
    return [c for c in CHOICES if c.stage == stage and (c.strategy is None or c.strategy == strategy)]
