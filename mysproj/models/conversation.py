"""LLaVA-1.5 prompts and image tensors, as the original code builds them (spec §1.6, §3, §6.8).

`llava_v1`: "<system> USER: <image>\\n<prompt> ASSISTANT:" and, in training, " <label></s>" after it, with the
loss on the label and `</s>` only (LLaVA's `preprocess_v1`, SeparatorStyle.TWO). `plain` (the seed's pretrain.sh):
the human turn becomes just `<image>`, then "<label>\\n" (LLaVA's `preprocess_plain`).
"""

from __future__ import annotations

SYSTEM_LLAVA_V1 = ("A chat between a curious human and an artificial intelligence assistant. The assistant gives "
                   "helpful, detailed, and polite answers to the human's questions.")
IGNORE_INDEX = -100


def llava_v1_prompt(human_value: str) -> str:
    """The inference prompt up to and including "ASSISTANT:" (the answer follows after a space)."""
    return f"{SYSTEM_LLAVA_V1} USER: {human_value} ASSISTANT:"


def pad_to_square(img, image_processor):
    from mysproj.data.images import expand2square

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


def expand_image_tokens(ids: list[int], image_token_id: int, n: int) -> list[int]:
    """Each `<image>` id becomes `n` copies: LlavaForConditionalGeneration scatters one patch feature per copy."""
    out: list[int] = []
    for i in ids:
        out.extend([i] * n if i == image_token_id else [i])
    return out


def training_example(tokenizer, human_value: str, label: str, image_token_id: int, image_seq_length: int,
                     conv: str = "v1", max_length: int = 2048) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one supervised example; labels are IGNORE_INDEX outside the answer."""
    if conv == "v1":
        prompt, answer = llava_v1_prompt(human_value), f" {label}"
    elif conv == "plain":
        prompt, answer = "<image>", f"{label}\n"
    else:
        raise ValueError(f"conv must be 'v1' or 'plain', not {conv!r}")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if conv == "v1":
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    prompt_ids = expand_image_tokens(prompt_ids, image_token_id, image_seq_length)
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return ids, labels
