"""Every prompt the project feeds LLaVA is tokenized as LLaVA's `tokenizer_image_token` tokenizes it, and training
labels are masked as `preprocess_v1` masks them: checked against ids computed by the upstream algorithm on a real
sentencepiece Llama-style model trained here, offline."""

import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from _sentencepiece import hf_tokenizer, processor, train_model, upstream_ids  # noqa: E402
from stage_runs import stage  # noqa: E402

HUMAN = '<image>\nClassify this image into one of the following categories relating to textures: "banded", ' \
        '"star field". Only output a single final classification label and NOTHING ELSE.'


@pytest.fixture(scope="module")
def sp_model():
    return train_model()


@pytest.fixture(scope="module", params=[False, True], ids=["legacy-false", "legacy-true"])
def llama(request, sp_model, tmp_path_factory):
    """(HF Llama tokenizer, raw sentencepiece processor, <image> id)."""
    tok = hf_tokenizer(sp_model, str(tmp_path_factory.mktemp("sp-tok")), legacy=request.param)
    return tok, processor(sp_model), tok.convert_tokens_to_ids("<image>")


def test_prompt_ids_are_tokenizer_image_token(llama):
    from mysproj.models.conversation import llava_v1_prompt
    from mysproj.models.prompt_ids import prompt_ids

    tok, sp, image = llama
    text = llava_v1_prompt(HUMAN)
    ids = prompt_ids(tok, text, image)
    assert ids == upstream_ids(sp, text, image)
    after = ids[ids.index(image) + 1:][:2]
    assert after == [sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")]  # "\n" is its own chunk's first character
    assert ids[0] == sp.bos_id() and ids.count(sp.bos_id()) == 1
    expanded = prompt_ids(tok, text, image, image_seq_length=3)
    assert expanded == ids[:ids.index(image)] + [image] * 3 + ids[ids.index(image) + 1:]


def test_training_text_is_vicuna_v1_and_labels_are_preprocess_v1s(llama):
    from mysproj.models.conversation import IGNORE_INDEX, training_example

    tok, sp, image = llama
    ex = training_example(tok, HUMAN, "star field", image)
    assert ex.text == ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                       "helpful, detailed, and polite answers to the user's questions. USER: " + HUMAN +
                       " ASSISTANT: star field</s>")
    assert ex.input_ids == upstream_ids(sp, ex.text, image)
    answer = sp.encode("star field") + [sp.eos_id()]  # "▁star ▁field </s>": no extra "▁" before the label
    n = len(answer)
    assert ex.labels[-n:] == answer and ex.labels[:-n] == [IGNORE_INDEX] * (len(ex.labels) - n)
    assert ex.mismatch is None
    ids, labels = ex.expanded(image, 4)
    assert ids.count(image) == 4 and len(labels) == len(ids) and labels[-n:] == answer


def test_plain_conversation_is_preprocess_plains(llama):
    from mysproj.models.conversation import IGNORE_INDEX, training_example

    tok, sp, image = llama
    ex = training_example(tok, HUMAN, "star field", image, conv="plain")
    assert ex.text == "<image>star field\n"
    assert ex.input_ids == upstream_ids(sp, ex.text, image)
    assert ex.labels[:2] == [IGNORE_INDEX] * 2 and ex.labels[2:] == sp.encode("star field\n")


def test_image_moves_to_the_front_of_the_turn(llama):
    from mysproj.models.conversation import training_example

    tok, _, image = llama
    moved = training_example(tok, " Which texture? <image> ", "brick", image)
    assert " USER: <image>\nWhich texture? ASSISTANT: brick</s>" in moved.text


def test_scored_continuations_are_the_supervised_tokens(llama):
    from mysproj.evaluation.scoring import continuation_ids
    from mysproj.models.conversation import IGNORE_INDEX, training_example

    tok, sp, image = llama
    for label in ("star field", "banded"):
        ex = training_example(tok, HUMAN, label, image)
        assert continuation_ids(tok, label) == [t for t in ex.labels if t != IGNORE_INDEX]
        assert continuation_ids(tok, label) == sp.encode(label) + [sp.eos_id()]


class CharTokenizer:
    """One id per character after a BOS; `</s>` is read as EOS except in texts holding one of `unknown_eos`."""

    bos_token_id, eos_token_id = 1, 2

    def __init__(self, unknown_eos=()):
        self.unknown_eos = unknown_eos

    def __call__(self, text, add_special_tokens=True):
        eos = not any(word in text for word in self.unknown_eos)
        ids = [self.bos_token_id] if add_special_tokens else []
        parts = text.split("</s>") if eos else [text]
        for k, part in enumerate(parts):
            ids += ([self.eos_token_id] if k else []) + [100 + ord(c) for c in part]
        return {"input_ids": ids}


def test_tokenization_mismatch_ignores_the_example_as_upstream():
    from mysproj.models.conversation import IGNORE_INDEX, training_example

    good = training_example(CharTokenizer(), "<image>\nWhich?", "brick", 5)
    assert [t for t in good.labels if t != IGNORE_INDEX] == [100 + ord(c) for c in " brick"] + [2]
    bad = training_example(CharTokenizer(unknown_eos=("brick",)), "<image>\nWhich?", "brick", 5)
    # counted: BOS + the round's ids (BOS, text, image); real: those + the 4 characters of "</s>"
    assert bad.mismatch == (len(bad.input_ids) - 3, len(bad.input_ids))
    assert bad.labels == [IGNORE_INDEX] * len(bad.input_ids)


def test_mismatches_are_warned_once_with_counts(prep_uri, caplog):
    from types import SimpleNamespace

    from mysproj.data.prepared import PreparedData
    from mysproj.errors import BadInput
    from mysproj.training.data import load_examples

    data = PreparedData(prep_uri)
    config = SimpleNamespace(image_token_index=5, image_seq_length=4)
    first = data.llava_records("train")[0]["conversations"][1]["value"]
    n_first = sum(r["conversations"][1]["value"] == first for r in data.llava_records("train"))
    with caplog.at_level(logging.WARNING, logger="mysproj.finetune"):
        examples = load_examples(data, CharTokenizer(unknown_eos=(f": {first}</s>",)), config, conv="v1",
                                 max_length=4096)
    warnings = [r.getMessage() for r in caplog.records if "tokenization mismatch" in r.getMessage()]
    assert len(warnings) == 1 and f"in {n_first} of {len(examples)} examples" in warnings[0]
    assert sum(e.n_targets == 0 for e in examples) == n_first
    with pytest.raises(BadInput, match="every llava_train.json example hits"):
        load_examples(data, CharTokenizer(unknown_eos=("</s>",)), config, conv="v1", max_length=4096)


@pytest.fixture(scope="module")
def sp_llava(sp_model, tmp_path_factory):
    """A tiny random LLaVA whose tokenizer is the sentencepiece one (llava-hf's layout: legacy false)."""
    from transformers import LlavaForConditionalGeneration

    from mysproj.models.presets import PRESETS, image_processor, llava_config
    from mysproj.models.saving import save_hf_model

    root = tmp_path_factory.mktemp("sp-llava")
    tok = hf_tokenizer(sp_model, str(root / "tok"), legacy=False)
    config = llava_config(PRESETS["tiny"], tok)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    save_hf_model(model.state_dict(), config, tok, image_processor(PRESETS["tiny"].image_size), str(root / "model"))
    return str(root / "model"), processor(sp_model), tok.convert_tokens_to_ids("<image>")


def _expanded(ids, image, n):
    from mysproj.models.prompt_ids import expand_image_tokens

    return expand_image_tokens(ids, image, n)


def test_training_examples_carry_the_upstream_ids(sp_llava, prep_uri):
    from mysproj.data.prepared import PreparedData
    from mysproj.models.conversation import SYSTEM_VICUNA_V1, v1_text
    from mysproj.models.loading import load_llava
    from mysproj.training.data import load_examples

    uri, sp, image = sp_llava
    loaded = load_llava(uri)
    data = PreparedData(prep_uri)
    examples = load_examples(data, loaded.tokenizer, loaded.model.config, conv="v1", max_length=2048)
    for rec, ex in zip(data.llava_records("train"), examples):
        human, label = (t["value"] for t in rec["conversations"])
        text = v1_text(SYSTEM_VICUNA_V1, [(human, label)])
        assert ex.input_ids == _expanded(upstream_ids(sp, text, image), image, 4)
        assert [t for t in ex.labels if t != -100] == sp.encode(label) + [sp.eos_id()]


@pytest.mark.parametrize("mode", ["generate", "scoring"])
def test_eval_llava_feeds_the_upstream_ids(sp_llava, prep_uri, tmp_path, monkeypatch, mode):
    from mysproj.data.prepared import PreparedData
    from mysproj.evaluation import scoring
    from mysproj.models.conversation import llava_v1_prompt
    from mysproj.stages import eval_llava

    uri, sp, image = sp_llava
    rows = []
    if mode == "generate":  # the ids the greedy decoder is given
        answers = eval_llava.generate_answers
        monkeypatch.setattr(eval_llava, "generate_answers",
                            lambda model, tok, prompts, *a, **kw: rows.extend(prompts) or answers(model, tok, prompts,
                                                                                                  *a, **kw))
    else:
        left_pad = scoring.left_pad
        monkeypatch.setattr(scoring, "left_pad", lambda r, *a: rows.extend(r) or left_pad(r, *a))
    stage("eval-llava", model=uri, data=prep_uri, out=str(tmp_path / mode), mode=mode, workers=0,
                  batch_size=2, limit=3, max_new_tokens=2)
    humans = [r["conversations"][0]["value"] for r in PreparedData(prep_uri).llava_records("test")[:3]]
    assert rows == [_expanded(upstream_ids(sp, llava_v1_prompt(h), image), image, 4) for h in humans]


def test_ask_feeds_the_upstream_ids(sp_llava, prep_uri):
    from mysproj.commands.ask import answer, open_session
    from mysproj.data.prepared import PreparedData
    from mysproj.models.conversation import llava_v1_prompt

    uri, sp, image = sp_llava
    data = PreparedData(prep_uri)
    session = open_session(uri, data.local_image(data.samples("test")[0]))
    fed, generate = [], session.model.generate
    session.model.generate = lambda **kw: fed.append(kw["input_ids"][0].tolist()) or generate(**kw)
    answer(session, "Which texture?", temperature=0, max_new_tokens=2)
    assert fed == [_expanded(upstream_ids(sp, llava_v1_prompt("<image>\nWhich texture?"), image), image, 4)]
