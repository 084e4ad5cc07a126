"""eval-llava's decoding choices: sampling as the released code's cli.py (seeded, reproducible), the line-break stop for
models fine-tuned with conv=plain (in the greedy loop and in transformers' generate), and the pipeline running
a sampled zero-shot evaluation once per seed."""

import json
import os

import pytest

from mysproj.config.fields import load_config
from mysproj.pipeline import dag

pq = pytest.importorskip("pyarrow.parquet")


def test_first_line_and_the_newline_rule():
    from mysproj.evaluation.decoding import first_line

    assert first_line("banded\nbraided") == "banded"
    assert first_line("\n  banded \nbraided") == "banded "
    assert first_line("banded") == "banded"


def test_the_parser_no_longer_sees_a_second_line():
    """A plain-trained model's answer "banded\\nbraided ..." : the longest contained class used to win."""
    from mysproj.evaluation.answers import AnswerParser
    from mysproj.evaluation.decoding import first_line

    parser = AnswerParser(["banded", "braided stripes"])
    answer = "banded\nbraided stripes and more"
    assert parser(answer).label == "braided stripes"  # what reading every generated token gave
    assert parser(first_line(answer)).label == "banded"


def test_newline_ids_of_a_llama_tokenizer(tmp_path):
    pytest.importorskip("sentencepiece")
    from _sentencepiece import hf_tokenizer, train_model

    from mysproj.evaluation.decoding import NewlineStop

    tok = hf_tokenizer(train_model(), str(tmp_path / "tok"), legacy=False)
    stop = NewlineStop(tok)
    newline = tok.convert_tokens_to_ids("<0x0A>")
    assert newline in stop.ids and tok.eos_token_id not in stop.ids
    word = tok.encode("banded", add_special_tokens=False)
    assert stop(word, newline) and not stop([], newline) and not stop(word, word[0])


@pytest.fixture(scope="module")
def tiny(prep_uri, llava_tiny_uri):
    from stage_runs import llava_test_inputs

    from mysproj.models.loading import load_llava

    loaded = load_llava(llava_tiny_uri)
    loaded.model.requires_grad_(False)
    _, prompts, pix = llava_test_inputs(prep_uri, loaded, 4, {1: " Answer in one word."})
    return loaded, prompts, pix


def test_a_stop_rule_ends_rows_in_both_decoders(tiny):
    """The same rule (here: after two tokens) cuts the greedy loop's and transformers' answers at the same place."""
    from mysproj.evaluation import decoding
    from mysproj.evaluation.greedy import GreedyDecoder
    from mysproj.evaluation.scoring import left_pad

    loaded, prompts, pix = tiny
    tok = loaded.tokenizer
    decoder = GreedyDecoder(loaded.model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_rows=4)
    full = decoder(prompts, pix, 8)
    assert all(len(r) > 2 for r in full)

    def rule(answer, token):
        return len(answer) == 2

    assert decoder(prompts, pix, 8, rule) == [r[:2] for r in full]
    batch = left_pad(prompts, tok.pad_token_id, "cpu")
    texts = decoding.generate(loaded.model, batch, pix, 8, tok.pad_token_id, tok, stop=rule)
    assert texts == tok.batch_decode([r[:2] for r in full], skip_special_tokens=True)


def test_sampling_is_seeded(tiny):
    from mysproj.evaluation import decoding
    from mysproj.evaluation.scoring import left_pad

    loaded, prompts, pix = tiny
    tok = loaded.tokenizer
    batch = left_pad(prompts, tok.pad_token_id, "cpu")

    def draw(seed):
        return decoding.generate(loaded.model, batch, pix, 8, tok.pad_token_id, tok, temperature=1.0, seed=seed)

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert draw(3) != decoding.generate(loaded.model, batch, pix, 8, tok.pad_token_id, tok)  # not greedy


def _eval(tmp_path, name, prep_uri, model, **fields):
    from stage_runs import stage

    out = str(tmp_path / name)
    stage("eval-llava", model=model, data=prep_uri, out=out, workers=0, batch_size=4, limit=6, max_new_tokens=8,
          **fields)
    return (pq.read_table(os.path.join(out, "predictions.parquet")).to_pylist(),
            json.load(open(os.path.join(out, "metrics.json"))))


def test_stage_samples_reproducibly_and_names_its_decoding(tmp_path, prep_uri, llava_tiny_uri):
    a, ma = _eval(tmp_path, "a", prep_uri, llava_tiny_uri, temperature=1.0, seed=1)
    b, _ = _eval(tmp_path, "b", prep_uri, llava_tiny_uri, temperature=1.0, seed=1)
    c, _ = _eval(tmp_path, "c", prep_uri, llava_tiny_uri, temperature=1.0, seed=2)
    assert [r["answer"] for r in a] == [r["answer"] for r in b]
    assert [r["answer"] for r in a] != [r["answer"] for r in c]
    assert ma["decoding"] == "sampled at temperature 1, seed 1, at most 8 new tokens, stop at `</s>`"
    assert (ma["temperature"], ma["seed"], ma["stop"]) == (1.0, 1, "eos")
    greedy, mg = _eval(tmp_path, "g", prep_uri, llava_tiny_uri)
    assert mg["decoding"] == "greedy, at most 8 new tokens, stop at `</s>`" and mg["seed"] is None


def test_stop_auto_reads_the_fine_tune_behind_the_model(tmp_path):
    """A merge of a conv=plain projector stops at a line break; a v1 one, or a base model, at </s>."""
    from mysproj.config.stages import EvalLlavaConfig, FinetuneConfig, MergeConfig
    from mysproj.evaluation.decoding import resolve_stop
    from mysproj.storage.manifest import run_stage

    def write(cfg, stage):
        run_stage(stage, cfg, lambda out: (out.write_json("x.json", {}), {})[1])

    for conv in ("plain", "v1"):
        ft, merged = str(tmp_path / conv / "ft"), str(tmp_path / conv / "merge")
        write(FinetuneConfig(model="/base", data="/d", conv=conv, out=ft), "finetune")
        write(MergeConfig(base="/base", projector=ft, out=merged), "merge")
        want = "newline" if conv == "plain" else "eos"
        assert resolve_stop(EvalLlavaConfig(model=merged, data="/d", out="/o")) == want
    assert resolve_stop(EvalLlavaConfig(model=str(tmp_path / "none"), data="/d", out="/o")) == "eos"
    assert resolve_stop(EvalLlavaConfig(model=merged, data="/d", out="/o", stop="newline")) == "newline"


def test_stage_with_the_newline_stop_answers_one_line(tmp_path, prep_uri, llava_tiny_uri):
    rows, metrics = _eval(tmp_path, "nl", prep_uri, llava_tiny_uri, stop="newline", temperature=1.0, seed=5)
    assert metrics["stop"] == "newline" and metrics["decoding"].endswith("stop at a line break")
    assert all("\n" not in r["answer"] for r in rows)


def _cfg(**kw):
    return load_config(dag.PipelineConfig, overrides=kw, env={})


def test_a_sampled_zero_shot_evaluation_runs_once_per_seed():
    paper = [n for n in dag.build(_cfg(root="/r", seeds=[0, 1, 2])) if n.stage == "eval-llava"]
    assert [n.name for n in paper if "zero-shot" in n.name] == ["textures-mini/zero-shot/eval-llava"]
    released = [n for n in dag.build(_cfg(root="/r", seeds=[0, 1, 2], recipe="released")) if n.stage == "eval-llava"]
    zero = [n for n in released if "zero-shot" in n.name]
    assert [n.name for n in zero] == [f"textures-mini/zero-shot/seed{s}/eval-llava" for s in (0, 1, 2)]
    assert [n.config["seed"] for n in zero] == [0, 1, 2]
    assert {(n.config["temperature"], n.config["max_new_tokens"]) for n in released} == {(0.2, 512)}
    tuned = [n for n in released if "zero-shot" not in n.name]
    assert sorted(n.config["seed"] for n in tuned) == [0, 0, 1, 1, 2, 2]
    override = dag.build(_cfg(root="/r", seeds=[0, 1], overrides={"eval-llava": {"temperature": 0.7}}))
    assert len([n for n in override if n.stage == "eval-llava" and "zero-shot" in n.name]) == 2
