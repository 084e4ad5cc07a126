"""`mysproj show-example --model URI --data URI [--split train|test] [--index N] [--json]`: exactly what the model
sees for one example of a prep output: the rendered conversation (one `<image>`), its token ids before the image is
expanded (the model's `<image>` id once, where LLaVA's own code holds -200) and, for the train split, the labels
(-100 where masked), built by the same functions fine-tuning and eval-llava call; then the choices the `--recipe`
makes for that stage (image processor, batching, decoding, and where answers stop for this model). Only the
tokenizer and the config are read, never the weights, so it is instant on a 7B model too.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from mysproj.config.recipes import stage_fields
from mysproj.data.prepared import PreparedData
from mysproj.errors import BadInput
from mysproj.models import integrity
from mysproj.storage import cache
from mysproj.storage import uri as U
from mysproj.storage.manifest import MANIFEST, StageInput

WEIGHT_SUFFIXES = integrity.WEIGHT_SUFFIXES + (".safetensors.index.json", ".bin.index.json")


def add_command(sub, parser_class) -> None:
    p = sub.add_parser("show-example", help="print the conversation text, input ids and labels of one example, as "
                                            "fine-tuning (train) or eval-llava (test) builds them")
    p.add_argument("--model", required=True, help="LLaVA model URI (its tokenizer and config are read)")
    p.add_argument("--data", required=True, help="prep output URI")
    p.add_argument("--split", default="train", choices=("train", "test"), help="train: the fine-tuning "
                   "conversation and labels; test: the evaluation prompt")
    p.add_argument("--index", type=int, default=0, help="record index in llava_<split>.json")
    p.add_argument("--conv", default="v1", choices=("v1", "plain"), help="train split: finetune's conv field")
    p.add_argument("--model-max-length", type=int, default=2048, help="train split: finetune's model_max_length "
                   "(where LLaVA's mismatch check applies)")
    p.add_argument("--recipe", default="paper", choices=("paper", "released"), help="the pipeline recipe whose "
                   "choices for this split's stage are listed (fine-tuning for train, eval-llava for test)")
    p.add_argument("--strategy", default="projector", choices=("projector", "full", "lora"), help="train split: "
                   "the fine-tuning strategy whose recipe choices are listed")
    p.add_argument("--json", action="store_true", help="one JSON object: text, input_ids, labels (train), split, "
                   "conv, choices")
    p.set_defaults(func=_run)


def tokenizer_folder(uri: str) -> str:
    """A local folder with the model's config and tokenizer files, without its weights (a local stage output:
    its own folder, only those files verified)."""

    uri = str(uri).rstrip("/")
    inp = StageInput.if_complete(uri)
    if inp is not None:
        names = [n for n in inp.files if "/" not in n and n != MANIFEST and not n.endswith(WEIGHT_SUFFIXES)]
        if "config.json" not in names:
            raise BadInput(f"{uri}: its {inp.manifest.get('stage')} output holds no model config (a projector-only "
                           f"fine-tune? pass its merge output or the base model)")
        return inp.local_dir(names=names)
    if U.is_local(uri):
        if not os.path.isdir(U.local_path(uri)):
            raise BadInput(f"{uri}: no such model folder")
        return U.local_path(uri)
    names = [n for n in U.list_files(uri) if "/" not in n and not n.endswith(WEIGHT_SUFFIXES)]
    if not names:
        raise BadInput(f"{uri}: no such model folder (nothing stored under it)")
    return cache.assemble({n: cache.fetch(U.join(uri, n)) for n in names})


def load_tokenizer(uri: str):
    """(tokenizer, image token id) of a LLaVA model in the HF or the original layout (`<image>` added to an
    original-layout tokenizer as the conversion to the HF layout adds it)."""
    from transformers import AutoTokenizer  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments

    from mysproj.models.tokenizer import IMAGE_TOKEN, ensure_llava_tokens  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

    folder = tokenizer_folder(uri)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise BadInput(f"{uri}: no loadable tokenizer ({str(e).splitlines()[0]})") from None
    ensure_llava_tokens(tokenizer)
    config_path = os.path.join(folder, "config.json")
    config = json.load(open(config_path)) if os.path.exists(config_path) else {}
    image_id = config.get("image_token_index", config.get("image_token_id"))
    return tokenizer, image_id if image_id is not None else tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def choices(model: str, split: str, recipe: str = "paper", strategy: str = "projector") -> dict:
    """The recipe's values of the stage this split feeds (finetune for train, eval-llava for test); for test also
    where answers stop (`stop=auto` read from the fine-tune behind `model`)."""

    if split == "train":
        return stage_fields(recipe, "finetune", strategy)
    from mysproj.evaluation.decoding import resolve_stop  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

    return {**stage_fields(recipe, "eval-llava"), "stop": resolve_stop(SimpleNamespace(stop="auto", model=model))}


def example(model: str, data: str, split: str = "train", index: int = 0, conv: str = "v1",
            max_length: int = 2048) -> dict:
    """{"text", "input_ids", "labels" (train only), "split", "conv"} of record `index` of `llava_<split>.json`."""
    from mysproj.models.conversation import EVAL_CONV, TRAIN_CONVS, llava_v1_prompt, training_example  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments
    from mysproj.models.prompt_ids import prompt_ids  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

    records = PreparedData(data).llava_records(split)
    if not 0 <= index < len(records):
        raise BadInput(f"--index {index}: llava_{split}.json of {data} holds {len(records)} records (0 to "
                       f"{len(records) - 1})")
    turns = {t["from"]: t["value"] for t in records[index]["conversations"]}
    tokenizer, image_id = load_tokenizer(model)
    if split == "test":
        text = llava_v1_prompt(turns["human"])
        return {"text": text, "input_ids": prompt_ids(tokenizer, text, image_id), "split": split, "conv": EVAL_CONV}
    ex = training_example(tokenizer, turns["human"], turns["gpt"], image_id, conv, max_length)
    return {"text": ex.text, "input_ids": ex.input_ids, "labels": ex.labels, "split": split,
            "conv": TRAIN_CONVS[conv]}


def _run(ns) -> int:
    shown = example(ns.model, ns.data, ns.split, ns.index, ns.conv, ns.model_max_length)
    shown["choices"] = choices(ns.model, ns.split, ns.recipe, ns.strategy)
    if ns.json:
        print(json.dumps(shown))
        return 0
    print(f"split {shown['split']}, conversation {shown['conv']}, record {ns.index}")
    print("--- text ---")
    print(shown["text"])
    print("--- input_ids (the image once) ---")
    print(shown["input_ids"])
    if "labels" in shown:
        print("--- labels (-100 = masked) ---")
        print(shown["labels"])
    stage = "fine-tuning" if ns.split == "train" else "eval-llava"
    print(f"--- {stage}'s choices, recipe {ns.recipe} (docs/recipe.md) ---")
    for field, value in shown["choices"].items():
        print(f"{field}: {value}")
    return 0
