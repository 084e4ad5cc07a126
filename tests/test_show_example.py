"""`mysproj show-example`: the text, ids and labels fine-tuning and eval-llava build, for the tiny preset (a stage
output) and the 7B preset's tokenizer and config (a folder without weights)."""

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from stage_runs import error_lines  # noqa: E402


def _show(capsys, *args):
    from mysproj.cli import main

    rc = main(["show-example", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _records(prep_uri):
    from mysproj.data.prepared import PreparedData

    return PreparedData(prep_uri)


def test_train_and_test_examples_of_the_tiny_preset(llava_tiny_uri, prep_uri, capsys):
    from transformers import AutoTokenizer

    from mysproj.evaluation.scoring import continuation_ids
    from mysproj.models.conversation import SYSTEM_LLAVA_V1, SYSTEM_VICUNA_V1

    tok = AutoTokenizer.from_pretrained(llava_tiny_uri)
    image = tok.convert_tokens_to_ids("<image>")
    record = _records(prep_uri).llava_records("train")[2]
    human, label = (t["value"] for t in record["conversations"])
    rc, out, _ = _show(capsys, "--model", llava_tiny_uri, "--data", prep_uri, "--index", "2", "--json")
    shown = json.loads(out)
    assert rc == 0 and set(shown) == {"text", "input_ids", "labels", "split", "conv", "choices"}
    assert shown["choices"]["image_backend"] == "torchvision" and shown["choices"]["fill"] == "masked"
    assert (shown["split"], shown["conv"]) == ("train", "vicuna_v1")
    assert shown["text"] == f"{SYSTEM_VICUNA_V1} USER: {human} ASSISTANT: {label}</s>"
    assert shown["input_ids"].count(image) == 1 and len(shown["labels"]) == len(shown["input_ids"])
    assert [t for t in shown["labels"] if t != -100] == continuation_ids(tok, label)
    assert tok.decode(shown["input_ids"], skip_special_tokens=False) == "<s>" + shown["text"]

    test_human = _records(prep_uri).llava_records("test")[0]["conversations"][0]["value"]
    rc, out, _ = _show(capsys, "--model", llava_tiny_uri, "--data", prep_uri, "--split", "test", "--json")
    shown = json.loads(out)
    assert set(shown) == {"text", "input_ids", "split", "conv", "choices"} and shown["conv"] == "llava_v1"
    assert {k: shown["choices"][k] for k in ("temperature", "max_new_tokens", "stop")} == {
        "temperature": 0.0, "max_new_tokens": 32, "stop": "eos"}
    rc, out, _ = _show(capsys, "--model", llava_tiny_uri, "--data", prep_uri, "--split", "test", "--recipe",
                       "released")
    assert rc == 0 and "--- eval-llava's choices, recipe released (docs/recipe.md) ---" in out
    assert "temperature: 0.2" in out and "max_new_tokens: 512" in out and "image_backend: pil" in out
    assert shown["text"] == f"{SYSTEM_LLAVA_V1} USER: {test_human} ASSISTANT:"

    rc, out, _ = _show(capsys, "--model", llava_tiny_uri, "--data", prep_uri, "--conv", "plain")
    assert rc == 0 and "conversation plain" in out and "--- labels (-100 = masked) ---" in out


def test_the_7b_presets_tokenizer_without_weights(tmp_path, prep_uri, capsys):
    from mysproj.models.presets import PRESETS, llava_config
    from mysproj.models.tokenizer import build_tokenizer

    preset = PRESETS["llava-1.5-7b"]
    tok = build_tokenizer(preset.tokenizer_vocab)
    config = llava_config(preset, tok)
    folder = tmp_path / "llava-1.5-7b-tokenizer"
    config.save_pretrained(folder)
    tok.save_pretrained(folder)
    rc, out, _ = _show(capsys, "--model", str(folder), "--data", prep_uri, "--json")
    shown = json.loads(out)
    assert rc == 0 and shown["input_ids"].count(config.image_token_index) == 1
    assert config.image_seq_length == 576 and len(shown["input_ids"]) < 200  # the image not expanded


def test_a_bad_index_is_one_error_line(llava_tiny_uri, prep_uri, capsys):
    n = len(_records(prep_uri).llava_records("test"))
    rc, _, err = _show(capsys, "--model", llava_tiny_uri, "--data", prep_uri, "--split", "test", "--index", str(n))
    lines = error_lines(err)
    assert rc == 64 and len(lines) == 1 and f"holds {n} records" in lines[0]
