import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")



@pytest.fixture
def image_path(prep_uri):
    from mysproj.data.prepared import PreparedData

    data = PreparedData(prep_uri)
    return data.local_image(data.samples("test")[0])


def test_prompt_is_llava_v1_with_history():
    from mysproj.commands.ask import Session
    from mysproj.models.conversation import SYSTEM_LLAVA_V1, llava_v1_prompt

    s = Session(model=None, tokenizer=None, pixels=None, device="cpu")
    assert s.prompt("What is this?") == llava_v1_prompt("<image>\nWhat is this?")
    s.history.append(("What is this?", "Bricks."))
    assert s.prompt("Colour?") == (f"{SYSTEM_LLAVA_V1} USER: <image>\nWhat is this? ASSISTANT: Bricks.</s>"
                                   f"USER: Colour? ASSISTANT:")


def test_ask_streams_the_greedy_answer(llava_tiny_uri, image_path, capsys):
    from mysproj.cli import main

    rc = main(["ask", "--model", llava_tiny_uri, "--image", image_path, "--prompt", "Which texture is this?",
               "--temperature", "0", "--max-new-tokens", "6"])
    assert rc == 0
    printed = capsys.readouterr().out.strip()

    from mysproj.commands.ask import answer, open_session

    class Recorder:
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            pass

    session = open_session(llava_tiny_uri, image_path)
    rec = Recorder()
    text = answer(session, "Which texture is this?", temperature=0, max_new_tokens=6, streamer=rec)
    assert printed == text
    # generate() hands the streamer the prompt first, then each new token as it is produced
    assert rec.chunks[0].numel() > 6 and len(rec.chunks) >= 2
    assert all(c.numel() == 1 for c in rec.chunks[1:])


def test_interactive_loop_keeps_history(llava_tiny_uri, image_path, monkeypatch, capsys):
    from mysproj.cli import main
    from mysproj.commands import ask

    seen = []
    real = ask.answer

    def spy(session, q, **kw):
        seen.append(session.prompt(q))
        return real(session, q, **kw)

    monkeypatch.setattr(ask, "answer", spy)
    lines = iter(["First question?", "Second question?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["ask", "--model", llava_tiny_uri, "--image", image_path, "--temperature", "0",
                 "--max-new-tokens", "3"]) == 0
    assert len(seen) == 2
    assert seen[1].count("<image>") == 1 and "First question? ASSISTANT:" in seen[1] and "</s>USER: Second" in seen[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without a GPU")
def test_quantized_loading_without_gpu_is_a_clear_error(llava_tiny_uri, image_path, capsys):
    from mysproj.cli import main
    from mysproj.errors import EXIT_BAD_INPUT

    assert main(["ask", "--model", llava_tiny_uri, "--image", image_path, "--prompt", "x", "--load-4bit"]) \
        == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "--load-4bit needs" in err and "CUDA GPU" in err
