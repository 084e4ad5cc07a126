"""A real Llama-style sentencepiece tokenizer, trained offline in milliseconds (byte-fallback BPE, dummy prefix, no
whitespace normalisation, `<unk>`/`<s>`/`</s>` = 0/1/2, as Llama's), and LLaVA's `tokenizer_image_token` run on the
raw sentencepiece processor: the golden ids for the project's prompt ids."""

from __future__ import annotations

import io
import json
import os

SENTENCES = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions.",
    'USER: Classify this image into one of the following categories relating to textures: "banded", "striped", '
    '"star field", "brick". Only output a single final classification label and NOTHING ELSE. ASSISTANT: banded',
    "Output: striped dotted brick star field grass gravel wood. What is this? Which texture?",
]


def train_model() -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 20), model_writer=buf, vocab_size=600, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, split_digits=True,
        hard_vocab_limit=False, minloglevel=2)
    return buf.getvalue()


def processor(model: bytes):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=model)


def hf_tokenizer(model: bytes, folder: str, legacy: bool):
    """transformers' LlamaTokenizer for the model, with `<image>` and `<pad>` added as LLaVA's conversion adds them."""
    from transformers import AutoTokenizer

    from mysproj.models.tokenizer import ensure_llava_tokens

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, f)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ensure_llava_tokens(tok)
    return tok


def upstream_ids(sp, text: str, image_id: int) -> list[int]:
    """LLaVA's tokenizer_image_token with the Llama tokenizer: each `<image>`-separated chunk encoded on its own
    with its BOS (and `</s>`, which Llama's tokenizer reads as EOS, at a chunk's end), the first chunk's BOS kept,
    every later chunk's dropped, one image id between chunks."""
    def encode(chunk: str) -> list[int]:
        before, eos, after = chunk.partition("</s>")
        assert not after, "text after </s> is not needed here"
        return [sp.bos_id()] + sp.encode(before) + ([sp.eos_id()] if eos else [])

    chunks = [encode(c) for c in text.split("<image>")]
    ids = [chunks[0][0]]
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(image_id)
        ids += chunk[1:]
    return ids
