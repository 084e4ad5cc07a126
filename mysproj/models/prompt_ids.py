"""Token ids of a prompt that holds `<image>`, built the way LLaVA's `tokenizer_image_token` builds them
(llava/mm_utils.py): every prompt the project feeds a LLaVA model (training examples, both eval-llava modes,
`mysproj ask`) goes through `prompt_ids`.

The text is split at each `<image>` and every chunk is tokenized on its own, with the tokenizer's special tokens.
When the first chunk starts with BOS, that BOS is kept and the first token of every chunk is dropped (each chunk's
own BOS). One image id goes between consecutive chunks. With a Llama sentencepiece tokenizer each chunk also gets
its dummy-prefix `▁`, so "USER: <image>\\nClassify" gives `... ▁ <image> ▁ <0x0A> ...`; tokenizing the whole
string with `<image>` as an added token drops that second `▁` (and with it the prompt the released model saw).
"""

from __future__ import annotations

IMAGE_TOKEN = "<image>"


def prompt_ids(tokenizer, text: str, image_token_id: int | None = None, image_seq_length: int = 1) -> list[int]:
    """Token ids of `text` with each `<image>` as `image_seq_length` copies of `image_token_id` (1: the ids
    before expansion, as LLaVA's training code holds them; the model config's `image_seq_length`: what
    LlavaForConditionalGeneration takes). `image_token_id` may be None only for text without `<image>`."""
    chunks = [tokenizer(chunk, add_special_tokens=True)["input_ids"] for chunk in text.split(IMAGE_TOKEN)]
    if len(chunks) > 1 and image_token_id is None:
        raise ValueError("the text holds <image> but no image_token_id was given")
    ids: list[int] = []
    skip = 0
    if chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        skip = 1
        ids.append(chunks[0][0])
    for i, chunk in enumerate(chunks):
        if i:
            ids.extend([image_token_id] * image_seq_length)
        ids.extend(chunk[skip:])
    return ids


def expand_image_tokens(ids: list[int], image_token_id: int, n: int) -> list[int]:
    """Each image id becomes `n` copies: LlavaForConditionalGeneration scatters one patch feature per copy."""
    out: list[int] = []
    for i in ids:
        out.extend([i] * n if i == image_token_id else [i])
    return out
