"""`mysproj ask --model URI --image URI [--prompt TEXT]`: the released README's check that a model works
(`python -m llava.serve.cli`): one image, the `llava_v1` conversation, the answer streamed token by token.
Without `--prompt` it is an interactive loop (empty line or EOF ends it), keeping the conversation history as
LLaVA's CLI does. Sampling defaults are that CLI's (temperature 0.2, 512 new tokens); `--temperature 0` is greedy.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from typing import Any

from mysproj.data.images import DEFAULT_MAX_PIXELS, open_rgb
from mysproj.errors import BadInput
from mysproj.storage import read_bytes


def add_command(sub, parser_class) -> None:
    p = sub.add_parser("ask", help="ask a LLaVA model about one image (answer streamed; interactive without "
                                   "--prompt)")
    p.add_argument("--model", required=True, help="LLaVA model URI (HF or original layout, or a stage output)")
    p.add_argument("--image", required=True, help="image URI (path, file://, s3://, ...)")
    p.add_argument("--prompt", default=None, help="one question; omit for an interactive loop")
    p.add_argument("--vision-tower", default=None, help="CLIP tower folder for an original-layout model")
    p.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (LLaVA CLI default 0.2)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="answer budget (LLaVA CLI default 512)")
    p.add_argument("--image-aspect-ratio", default="pad", choices=("pad", "square"))
    p.add_argument("--max-image-pixels", type=int, default=None, help="refuse images declaring more pixels "
                   "(default: prep's default, 100 MP)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="4-bit weights (bitsandbytes, CUDA GPU)")
    quant.add_argument("--load-8bit", action="store_true", help="8-bit weights (bitsandbytes, CUDA GPU)")
    p.set_defaults(func=_run)


@dataclass
class Session:
    model: Any
    tokenizer: Any
    pixels: Any
    device: str
    history: list[tuple[str, str]] = field(default_factory=list)  # (question, answer) turns so far

    def prompt(self, question: str) -> str:
        """The llava_v1 conversation with the image in the first user turn (SeparatorStyle.TWO)."""
        from mysproj.models.conversation import SYSTEM_LLAVA_V1, v1_text  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

        turns = [*self.history, (question, None)]
        return v1_text(SYSTEM_LLAVA_V1, [(f"<image>\n{q}" if i == 0 else q, a) for i, (q, a) in enumerate(turns)])


def quantization(load_4bit: bool, load_8bit: bool):
    """A BitsAndBytesConfig, or None; BadInput with what is missing where quantization cannot work."""
    if not (load_4bit or load_8bit):
        return None

    import torch  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments

    flag = "--load-4bit" if load_4bit else "--load-8bit"
    missing = [what for what, ok in (("the bitsandbytes package (pip install bitsandbytes)",
                                      importlib.util.find_spec("bitsandbytes") is not None),
                                     ("a CUDA GPU", torch.cuda.is_available())) if not ok]
    if missing:
        raise BadInput(f"{flag} needs {' and '.join(missing)}; run without {flag} to load the full-precision "
                       f"weights")
    from transformers import BitsAndBytesConfig  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments

    if load_4bit:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float16,
                                  bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4")
    return BitsAndBytesConfig(load_in_8bit=True)


def open_session(model_uri: str, image_uri: str, *, vision_tower: str | None = None, aspect: str = "pad",
                 load_4bit: bool = False, load_8bit: bool = False, max_pixels: int | None = None) -> Session:
    import torch  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments

    from mysproj.models.conversation import pixel_values  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

    quant = quantization(load_4bit, load_8bit)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    image = open_rgb(read_bytes(image_uri), name=image_uri, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    if quant is None:
        from mysproj.models.loading import load_llava  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

        loaded = load_llava(model_uri, device=device, dtype=torch.float16 if device == "cuda" else None,
                            vision_tower=vision_tower)
        model, tokenizer, processor = loaded.model, loaded.tokenizer, loaded.image_processor
    else:
        model, tokenizer, processor = _load_quantized(model_uri, quant)
    pixels = pixel_values([image], processor, aspect).to(device, model.dtype)
    return Session(model, tokenizer, pixels, device)


def _load_quantized(model_uri: str, quant):
    import torch  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments

    from mysproj.models.loading import is_original_layout, materialize  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments
    from mysproj.models.original_layout import read_model_config  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

    folder, _ = materialize(model_uri)
    if is_original_layout(read_model_config(folder, model_uri)):
        raise BadInput(f"{model_uri}: 4/8-bit loading needs an HF-layout model (convert the original layout with "
                       f"`mysproj merge` or load it without quantization)")
    model = LlavaForConditionalGeneration.from_pretrained(folder, quantization_config=quant, dtype=torch.float16,
                                                          device_map="auto", local_files_only=True).eval()
    return (model, AutoTokenizer.from_pretrained(folder, local_files_only=True),
            AutoImageProcessor.from_pretrained(folder, local_files_only=True))


def answer(session: Session, question: str, *, temperature: float = 0.2, max_new_tokens: int = 512,
           streamer=None) -> str:
    """Generate (streaming into `streamer` when given), record the turn, return the answer text."""
    import torch  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments
    from transformers import GenerationConfig  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments

    from mysproj.models.prompt_ids import prompt_ids  # noqa: PLC0415 - torch side: the CLI imports this module to build its arguments

    tok, cfg = session.tokenizer, session.model.config
    ids = torch.tensor([prompt_ids(tok, session.prompt(question), cfg.image_token_id, cfg.image_seq_length)],
                       device=session.device)
    sampling = dict(do_sample=True, temperature=temperature) if temperature > 0 else dict(do_sample=False)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                               **sampling)
    with torch.no_grad():
        out = session.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     pixel_values=session.pixels, generation_config=gen_cfg, streamer=streamer)
    text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    session.history.append((question, text))
    return text


def _run(ns) -> int:
    from transformers import TextStreamer  # noqa: PLC0415 - torch: the CLI imports this module to build its arguments

    session = open_session(ns.model, ns.image, vision_tower=ns.vision_tower, aspect=ns.image_aspect_ratio,
                           load_4bit=ns.load_4bit, load_8bit=ns.load_8bit, max_pixels=ns.max_image_pixels)
    streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
    questions = [ns.prompt] if ns.prompt is not None else _interactive()
    for q in questions:
        if ns.prompt is None:
            print("ASSISTANT: ", end="", flush=True)
        answer(session, q, temperature=ns.temperature, max_new_tokens=ns.max_new_tokens, streamer=streamer)
        sys.stdout.flush()
    return 0


def _interactive():
    while True:
        try:
            q = input("USER: ")
        except EOFError:
            print()
            return
        if not q.strip():
            return
        yield q
