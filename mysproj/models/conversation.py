"""LLaVA-1.5 conversations and image tensors, as the released code builds them (docs/paper.md, docs/recipe.md).

- Training, `conv="v1"` (finetune_task.sh's `--version v1`): LLaVA's `conv_vicuna_v1`, "<system> USER:
  <image>\\n<prompt> ASSISTANT: <label></s>", with the labels `preprocess_v1` computes (below).
- Training, `conv="plain"` (pretrain.sh's `--version plain`): the human turn becomes just `<image>`, then
  "<label>\\n", the label and the newline supervised (`preprocess_plain`).
- Evaluation and `mysproj ask` (the released `llava/serve/cli.py` on a model named "...v1..."): `conv_llava_v1`, the
  same template with another system sentence ("human" where vicuna_v1 says "user"), as upstream trains and
  evaluates.

Every text becomes ids through `mysproj.models.prompt_ids.prompt_ids` (LLaVA's `tokenizer_image_token`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from mysproj.data.images import expand2square
from mysproj.models.prompt_ids import IMAGE_TOKEN, expand_image_tokens, prompt_ids

SYSTEM_VICUNA_V1 = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                    "helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
USER, ASSISTANT = "USER", "ASSISTANT"
SEP, SEP2 = " ", "</s>"     # SeparatorStyle.TWO: after a question, after an answer
PLAIN_SEP = "\n"
IGNORE_INDEX = -100
TRAIN_CONVS = {"v1": "vicuna_v1", "plain": "plain"}  # finetune `conv` value -> LLaVA template name
EVAL_CONV = "llava_v1"


def v1_text(system: str, turns: list[tuple[str, str | None]]) -> str:
    """`Conversation.get_prompt` for SeparatorStyle.TWO: the system sentence, then "USER: <q> ASSISTANT: <a></s>"
    per turn; a last turn without an answer ends with "ASSISTANT:"."""
    text = system + SEP
    for question, answer in turns:
        text += f"{USER}: {question}{SEP}"
        text += f"{ASSISTANT}:" if answer is None else f"{ASSISTANT}: {answer}{SEP2}"
    return text


def llava_v1_prompt(human_value: str) -> str:
    """The evaluation prompt up to and including "ASSISTANT:" (the answer follows after a space)."""
    return v1_text(SYSTEM_LLAVA_V1, [(human_value, None)])


def image_first(value: str) -> str:
    """`preprocess_multimodal`: a turn holding `<image>` becomes "<image>\\n" + the rest, stripped."""
    if IMAGE_TOKEN not in value:
        return value
    return (IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()).strip()


@dataclass
class TrainingExample:
    text: str                # the conversation as rendered (one `<image>`)
    input_ids: list[int]     # one image id per `<image>`: before expansion, as LLaVA's training code holds them
    labels: list[int]        # IGNORE_INDEX where not supervised
    mismatch: tuple[int, int] | None = None  # preprocess_v1's (counted, actual) lengths where they differ

    def expanded(self, image_token_id: int, image_seq_length: int) -> tuple[list[int], list[int]]:
        """(input_ids, labels) with each image id repeated `image_seq_length` times (labels masked there)."""
        labels: list[int] = []
        for i, lab in zip(self.input_ids, self.labels):
            labels.extend([IGNORE_INDEX] * image_seq_length if i == image_token_id else [lab])
        return expand_image_tokens(self.input_ids, image_token_id, image_seq_length), labels


def training_example(tokenizer, human_value: str, label: str, image_token_id: int, conv: str = "v1",
                     max_length: int = 2048) -> TrainingExample:
    """One supervised example as LLaVA's `preprocess_v1` (conv v1) or `preprocess_plain` (conv plain) builds it."""
    if conv == "v1":
        text = v1_text(SYSTEM_VICUNA_V1, [(image_first(human_value), label)])
        ids = prompt_ids(tokenizer, text, image_token_id)
        labels, mismatch = v1_labels(tokenizer, text, ids, image_token_id, max_length)
        return TrainingExample(text, ids, labels, mismatch)
    if conv == "plain":
        text = IMAGE_TOKEN + label + PLAIN_SEP
        ids = prompt_ids(tokenizer, text, image_token_id)
        masked = len(prompt_ids(tokenizer, IMAGE_TOKEN, image_token_id))
        return TrainingExample(text, ids, [IGNORE_INDEX] * masked + ids[masked:])
    raise ValueError(f"conv must be one of {', '.join(TRAIN_CONVS)}, not {conv!r}")


def v1_labels(tokenizer, text: str, ids: list[int], image_token_id: int,
              max_length: int) -> tuple[list[int], tuple[int, int] | None]:
    """`preprocess_v1`'s targets for the ids of `text`: the first token masked, then per round (split at "</s>")
    the instruction masked, its length counted as the ids of "<round up to> ASSISTANT: " minus 2 (BOS and the
    trailing space's token), and the round's length as its own ids (BOS included: it stands in for the "</s>"
    the split removed). Where the counted length differs from the real one, every label is masked and the
    (counted, real) pair returned: the sample adds no loss, as upstream's "tokenization mismatch" warning says."""
    labels = list(ids)
    sep = f"{SEP}{ASSISTANT}: "
    cur = 1
    labels[:cur] = [IGNORE_INDEX] * min(cur, len(labels))
    for i, rnd in enumerate(text.split(SEP2)):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(prompt_ids(tokenizer, rnd, image_token_id))
        instruction_len = len(prompt_ids(tokenizer, parts[0] + sep, image_token_id)) - 2
        if i != 0 and not getattr(tokenizer, "legacy", True):  # upstream's rule for tokenizers >= 0.14
            round_len -= 1
            instruction_len -= 1
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur:cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    if cur < max_length and cur != len(ids):
        return [IGNORE_INDEX] * len(ids), (cur, len(ids))
    return labels, None


def pad_to_square(img, image_processor):
    background = tuple(int(x * 255) for x in image_processor.image_mean)
    return expand2square(img, background)


def pixel_values(images, image_processor, aspect: str = "pad"):
    """[B, 3, S, S] float tensor: LLaVA-1.5 `pad` (square with the CLIP mean, then the CLIP processor) or
    `square` (the processor's resize + centre crop alone)."""
    if aspect not in ("pad", "square"):
        raise ValueError(f"aspect must be 'pad' or 'square', not {aspect!r}")
    images = [img.convert("RGB") for img in images]
    if aspect == "pad":
        images = [pad_to_square(img, image_processor) for img in images]
    return image_processor(images=images, return_tensors="pt")["pixel_values"]


def _one_image(img, image_processor, aspect: str):
    return pixel_values([img], image_processor, aspect)[0]


def image_transform(image_processor, aspect: str = "pad"):
    """image -> [3, S, S] as `pixel_values` makes it: a per-image transform for DataLoader workers (picklable)."""
    return functools.partial(_one_image, image_processor=image_processor, aspect=aspect)
