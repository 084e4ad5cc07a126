"""Tiny stand-ins of the two hub repositories the paper's LLaVA comes from, file for file as the hub holds them,
to serve from a loopback hub server or write to a folder:

- `llava_original_files()`: liuhaotian/llava-v1.5-7b's layout — `config.json` (`LlavaLlamaForCausalLM`, `mm_*` keys,
  `mm_vision_tower` = openai/clip-vit-large-patch14-336), the tokenizer as released (SentencePiece
  `tokenizer.model`, a Vicuna-style vocabulary without `<image>`/`<pad>`), the weights as fp16 torch pickles
  `pytorch_model-0000N-of-00002.bin` + their index, and `mm_projector.bin`; no CLIP tower.
- `clip_files()`: openai/clip-vit-large-patch14-336's — an HF `CLIPModel` (`config.json`, fp32
  `pytorch_model.bin` with its position-id buffers, `preprocessor_config.json`) whose vision tower is the LLaVA's.

Both are the tiny preset's seeded random weights: `{relative path: bytes}`, the same on every call.
"""

from __future__ import annotations

import functools
import os
import tempfile

LLAVA_REPO = "liuhaotian/llava-v1.5-7b"
SPM_VOCAB = 500
CLIP_REPO = "openai/clip-vit-large-patch14-336"


def llava_original_files() -> dict[str, bytes]:
    return dict(_build()[0])


def clip_files() -> dict[str, bytes]:
    return dict(_build()[1])


def write_files(files: dict[str, bytes], folder: str) -> str:
    for rel, data in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return folder


def _read_all(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


def _sentencepiece_tokenizer() -> dict[str, bytes]:
    """Vicuna's tokenizer as released: a SentencePiece BPE model (`<unk>`, `<s>`, `</s>` = 0, 1, 2, byte fallback)
    and a LlamaTokenizer config; no `<image>`/`<pad>`."""
    import io
    import json

    import sentencepiece as spm

    from mysproj.models.tokenizer import _CORPUS

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS.splitlines() * 4), model_writer=buf,
                                   vocab_size=SPM_VOCAB, model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1,
                                   eos_id=2, pad_id=-1, minloglevel=2, num_threads=1)
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "pad_token": None, "add_bos_token": True, "add_eos_token": False, "model_max_length": 2048,
              "legacy": False, "padding_side": "right"}
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    return {"tokenizer.model": buf.getvalue(), "tokenizer_config.json": json.dumps(config, indent=2).encode(),
            "special_tokens_map.json": json.dumps(special, indent=2).encode()}


def _released_config(hf_config) -> dict:
    """config.json as liuhaotian/llava-v1.5-7b holds it (written by transformers 4.31), at the tiny sizes."""
    text, vision = hf_config.text_config, hf_config.vision_config
    return {
        "_name_or_path": "./checkpoints/vicuna-7b-v1-5", "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "hidden_act": "silu",
        "hidden_size": text.hidden_size, "image_aspect_ratio": "pad", "initializer_range": 0.02,
        "intermediate_size": text.intermediate_size, "max_position_embeddings": text.max_position_embeddings,
        "mm_hidden_size": vision.hidden_size, "mm_patch_merge_type": "flat", "mm_projector_lr": None,
        "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False, "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch", "mm_vision_select_layer": -2, "mm_vision_tower": CLIP_REPO,
        "model_type": "llava_llama", "num_attention_heads": text.num_attention_heads,
        "num_hidden_layers": text.num_hidden_layers, "num_key_value_heads": text.num_key_value_heads,
        "pad_token_id": 0, "pretraining_tp": 1, "rms_norm_eps": text.rms_norm_eps, "rope_scaling": None,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "torch_dtype": "float16", "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False, "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": False,
        "use_cache": True, "use_mm_proj": True, "vocab_size": SPM_VOCAB,
    }


@functools.cache
def _build() -> tuple[dict[str, bytes], dict[str, bytes]]:
    import json

    import torch
    from transformers import CLIPConfig, CLIPModel

    from mysproj.models.loading import write_original
    from mysproj.models.presets import build_random_llava
    from mysproj.models.tokenizer import build_tokenizer

    model, _, processor = build_random_llava("tiny", seed=0, dtype="float32", device="cpu")
    n = SPM_VOCAB
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        state[k] = state[k][:n].clone()
    llava_state = {k: v.half() for k, v in state.items() if not k.startswith("model.vision_tower.")}
    tower_state = {k[len("model.vision_tower."):]: v for k, v in state.items() if k.startswith("model.vision_tower.")}
    config = model.config
    config.text_config.vocab_size = n

    with tempfile.TemporaryDirectory() as tmp:
        llava_dir = os.path.join(tmp, "llava")
        write_original(llava_state, config, build_tokenizer(1024, llava_tokens=False), processor, llava_dir,
                       bin_shards=2)
        llava = {k: v for k, v in _read_all(llava_dir).items()
                 if not k.startswith("vision_tower") and not k.startswith(("tokenizer", "special_tokens"))}
    llava.update(_sentencepiece_tokenizer())
    llava["config.json"] = json.dumps(_released_config(config), indent=2, sort_keys=True).encode()

    vision = config.vision_config.to_dict()
    clip_cfg = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=49408, max_position_embeddings=77),
        vision_config={k: vision[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                              "num_attention_heads", "image_size", "patch_size", "hidden_act")},
        projection_dim=vision["projection_dim"])
    torch.manual_seed(1)
    clip = CLIPModel(clip_cfg)
    clip_state = dict(clip.state_dict())
    for k, v in tower_state.items():
        clip_state["vision_model." + k] = v
    # the released file also holds the position-id buffers (persistent in the transformers that wrote it)
    clip_state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    clip_state["vision_model.embeddings.position_ids"] = \
        torch.arange((vision["image_size"] // vision["patch_size"]) ** 2 + 1)[None]
    with tempfile.TemporaryDirectory() as tmp:
        clip_cfg.architectures = ["CLIPModel"]
        clip_cfg.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        torch.save({k: v.contiguous() for k, v in clip_state.items()}, os.path.join(tmp, "pytorch_model.bin"))
        clip_repo = _read_all(tmp)
    return llava, clip_repo
