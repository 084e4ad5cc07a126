"""eval-llava's decoding choices: greedy (the paper's protocol here) or sampled as the released `llava/serve/cli.py`
(`temperature` > 0: `do_sample=True`, `temperature`, `max_new_tokens`), and where an answer stops.

Answers stop at `</s>`; `stop=newline` (what `auto` picks for a model fine-tuned with `conv=plain`, whose training
answers end with `\\n`, not `</s>`) also stops an answer at its first line break after some text, and the answer
is cut there, so a second class name on a later line never reaches the parser.
"""

from __future__ import annotations

import logging

import torch
from transformers import GenerationConfig, StoppingCriteriaList

from mysproj.config.lineage import finetune_config

log = logging.getLogger(__name__)
# cli.py sets no top_k: the transformers it pinned (4.37) then kept the 50 most likely tokens (GenerationConfig's
# default then; transformers 5 leaves it unset)
SAMPLING_TOP_K = 50


def samples(cfg) -> bool:
    return cfg.mode == "generate" and cfg.temperature > 0


def resolve_stop(cfg) -> str:
    """`eos` or `newline`: `auto` reads the fine-tune behind the model (its own manifest, or through a merge)."""
    if cfg.stop != "auto":
        return cfg.stop

    tuned = finetune_config(cfg.model, {})
    return "newline" if tuned is not None and tuned.get("conv") == "plain" else "eos"


def first_line(text: str) -> str:
    """The answer up to its first line break after some text (leading blank lines skipped)."""
    return text.lstrip().split("\n", 1)[0]


def newline_ids(tokenizer) -> set[int]:
    """Ids of the vocabulary's tokens whose text holds a line break (`<0x0A>` of a Llama tokenizer)."""
    ids = set()
    for token, i in tokenizer.get_vocab().items():
        if "\n" in token or token in ("<0x0A>", "Ċ") or "\n" in tokenizer.convert_tokens_to_string([token]):
            ids.add(i)
    ids -= set(tokenizer.all_special_ids)
    return ids


class NewlineStop:
    """`stop(answer_ids, token)`: True where `token` breaks the line of an answer that already holds text."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, newline_ids(tokenizer)

    def __call__(self, answer_ids: list[int], token: int) -> bool:
        return token in self.ids and bool(self.tokenizer.decode(answer_ids, skip_special_tokens=True).strip())


class _RowsStop:
    """transformers' StoppingCriteria (per row) for a stop rule after a prompt of `width` tokens; `ends[row]` is
    the answer length where the rule fired (transformers keeps that token; the answer does not)."""

    def __init__(self, stop, width: int):
        self.stop, self.width, self.ends = stop, width, {}

    def __call__(self, input_ids, scores, **kwargs):
        done = []
        for r, row in enumerate(input_ids):
            if r not in self.ends and self.stop(row[self.width:-1].tolist(), int(row[-1])):
                self.ends[r] = len(row) - 1 - self.width
            done.append(r in self.ends)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def generate(model, batch, pixel_values, max_new_tokens: int, pad_id: int, tokenizer, *, temperature: float = 0.0,
             top_p: float | None = None, seed: int | None = None, stop: NewlineStop | None = None) -> list[str]:
    """Answers (text after the prompt, special tokens dropped) of transformers' generate for a left-padded batch:
    greedy, or sampled at `temperature` (and `top_p`) from `seed` (one generator state per batch)."""

    sample = temperature > 0
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sample, num_beams=1, pad_token_id=pad_id,
                               eos_token_id=tokenizer.eos_token_id,
                               **({"temperature": temperature, "top_p": top_p if top_p is not None else 1.0,
                                   "top_k": SAMPLING_TOP_K} if sample else {}))
    width = batch.input_ids.shape[1]
    rows_stop = _RowsStop(stop, width) if stop is not None else None
    with torch.no_grad():
        if sample and seed is not None:
            torch.manual_seed(seed)
        ids = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             pixel_values=pixel_values, generation_config=gen_cfg,
                             stopping_criteria=StoppingCriteriaList([rows_stop]) if rows_stop else None)
    answers = ids[:, width:].tolist()
    for r, end in (rows_stop.ends if rows_stop else {}).items():
        answers[r] = answers[r][:end]
    return tokenizer.batch_decode(answers, skip_special_tokens=True)
