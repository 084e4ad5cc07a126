"""One config dataclass per stage. CLI flags (`--field-name`), env vars (`MYSPROJ_FIELD_NAME`), YAML keys and the
Helm chart's per-stage values all map onto these fields. No ML imports here: the controller reads them too.

Defaults follow the paper's text; every question the paper and its released code leave open is an option
(docs/recipe.md#decisions-left-open-upstream).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from mysproj.config.datasets import RECORDS
from mysproj.config.fields import ConfigError, opt, register_config_classes

CRISISMMD_DEFAULT_CLASSES = ["affected_individuals", "infrastructure_and_utility_damage",
                             "rescue_volunteering_or_donation_effort", "vehicle_damage"]
STRATEGIES = ("projector", "full", "lora")
# Fine-tuning defaults per strategy, the released scripts' (pretrain.sh, finetune_task.sh, finetune_task_lora.sh on
# 2 GPUs): the one place they live; `lr`, `projector_lr` and `global_batch` unset mean these.
DEFAULT_LR = {"projector": 1e-3, "full": 2e-5, "lora": 2e-4}
DEFAULT_PROJECTOR_LR = 2e-5  # lora's projector group (the released mm_projector_lr)
DEFAULT_GLOBAL_BATCH = {"projector": 64, "full": 32, "lora": 32}


def _short(value: float) -> str:
    return f"{value:.0e}".replace("e-0", "e-") if isinstance(value, float) else str(value)


def _per_strategy(values: dict) -> str:
    return ", ".join(f"{_short(v)} {s}" for s, v in values.items())


def compile_cache_opt():
    """The `compile_cache` field of every stage that compiles."""
    return opt(None, help="folder URI where torch.compile's caches are kept and shared (loaded before compiling, new "
               "artifacts added after; the pipeline uses <root>/compile-cache); unset = compile afresh", hashed=False)


def image_backend_opt():
    """The `image_backend` field of the stages that feed LLaVA images."""
    return opt("torchvision", help="CLIP image processor implementation: torchvision (transformers 5's default) "
               "or pil (CLIPImageProcessorPil: the PIL resize of the transformers the released scripts pinned, 1-2 "
               "levels of 255 apart)", choices=("torchvision", "pil"))


def decode_opt():
    """The `decode` field of the stages that feed images to a model (eval-clip, eval-llava, probe)."""
    return opt("cpu", help="cpu = PIL and the model's image transform in the DataLoader workers (the released code's "
               "preprocessing); device = JPEGs decoded in batches on the model's device (nvJPEG on a GPU) and padded, "
               "resized, cropped and normalised there as tensors (the CPU result within rounding); other files still "
               "go through PIL", choices=("cpu", "device"))


def tensorboard_opt():
    """The `tensorboard` field of every stage that logs metrics (docs/observability.md)."""
    return opt(True, help="write TensorBoard event files into the output (`tensorboard --logdir <run root>`)",
               hashed=False)


def mlflow_uri_opt():
    """The `mlflow_uri` field of every stage that logs to MLflow (docs/observability.md)."""
    return opt(None, help="MLflow tracking server URI (http://host:5000); unset = no MLflow. A server that is down "
               "costs one warning line, never the stage", hashed=False)


def wandb_project_opt():
    """The `wandb_project` field of every stage that logs to Weights & Biases (docs/observability.md)."""
    return opt(None, help="Weights & Biases project; unset = no W&B (API key from WANDB_API_KEY only; "
               "WANDB_MODE=offline writes locally)", hashed=False)


def mlflow_experiment_opt():
    return opt("mysproj", help="MLflow experiment of the run", hashed=False)


def direct_load_opt():
    """The `direct_load` field of the stages that load a model onto a GPU."""
    return opt(True, help="GPU runs: the model's safetensors weights read straight onto the GPU, without a CPU copy "
               "of the whole model first (the same weights)", hashed=False)


FETCH_CONTENTS = ("dataset", "llava", "clip", "files")
# The released LLaVA-1.5-7B (original layout, pickled shards) and the CLIP tower its config names, pinned.
LLAVA_ORIGIN = "hf://liuhaotian/llava-v1.5-7b@4481d270cc22fd5c4d1bb5df129622006ccd9234"
# (its repo also holds TensorFlow and Flax copies of the weights: left out)
CLIP_ORIGIN = ("hf://openai/clip-vit-large-patch14-336@ce19dc912ca5cd21c8a653c79e251e808ccabcd1"
               "#exclude=*.h5,*.msgpack")


@dataclass(kw_only=True)
class FetchConfig:
    """Stage in a dataset or model from its public origin (https://, github://, hf://, kaggle://), verified, into a
    stage output that later stages read as they read any folder (docs/stage-in.md)."""

    source: list[str] = opt(help="origin URIs, fetched into one folder: URL[#sha256=HEX][&into=DIR], "
                            "github://OWNER/REPO@COMMIT, hf://[datasets/]ORG/REPO[@REVISION], "
                            "kaggle://OWNER/DATASET[/versions/N]", default_factory=list)
    out: str = opt(help="output folder URI")
    content: str = opt("dataset", help="what the origin holds: dataset (archives unpacked), llava (a LLaVA model, "
                       "written as an HF-layout safetensors folder), clip (a CLIP model, safetensors), files (as "
                       "downloaded)", choices=FETCH_CONTENTS)
    tower: str | None = opt(None, help="llava in the original layout: the fetched CLIP vision tower (a fetch output) "
                            "its config's mm_vision_tower names", input=True, fetch="clip")
    connections: int = opt(8, help="parallel ranged connections per file", min=1, max=64, hashed=False)
    chunk_mib: int = opt(64, help="size of the resumable pieces a file is fetched in (MiB); finished pieces survive "
                         "a killed pod", min=1, hashed=False)

    def check(self) -> None:
        if not self.source:
            raise ConfigError("config field 'source' is empty: pass --source URI[,URI...]")


@dataclass(kw_only=True)
class PrepConfig:
    """Prepare a dataset: samples, CSVs in the released format, LLaVA JSONs with the paper's prompt, classes, report."""

    dataset: str = opt(help="dataset layout to read", choices=RECORDS)  # the live records
    out: str = opt(help="output folder URI")
    source: str | None = opt(None, help="dataset root URI or origin (https://…#sha256=…, github://, kaggle://); not "
                             "needed for textures-mini", input=True, fetch="dataset")
    seed: int = opt(0, help="seed for the per-example class-order shuffle in the prompt", min=0)
    label_underscores: str = opt("space", help="label rule: underscores to spaces (paper) or deleted (the "
                                 "released format script)", choices=("space", "delete"))
    task: str | None = opt(None, help="task phrase in the prompt; default per dataset (docs/recipe.md)")
    prompt_style: str = opt("paper", help="prompt ending: paper (Sec. 2 text) or code (the released script, adds "
                            "'\\n\\nOutput:')", choices=("paper", "code"))
    dtd_split: int = opt(1, help="DTD split number (labels/train<N>.txt, test<N>.txt)", min=1, max=10)
    crisismmd_label_column: str = opt("label_image", help="CrisisMMD TSV label column",
                                      choices=("label", "label_text", "label_image", "label_text_image"))
    crisismmd_classes: list[str] = opt(help="CrisisMMD classes kept (after merging); empty keeps all",
                                       default_factory=lambda: list(CRISISMMD_DEFAULT_CLASSES))
    crisismmd_merge: dict = opt(help="CrisisMMD label merge map, JSON {from: to}", default_factory=dict)
    train_split: str = opt("train", help="imagefolder: train split folder name")
    test_split: str = opt("test", help="imagefolder: test split folder name")
    max_per_class: int | None = opt(None, help="keep at most N images per class and split, a seeded sample "
                                    "(smoke runs)", min=1)
    patch_size: int = opt(128, help="textures-mini: tile side in pixels (non-overlapping tiles of each photo)",
                          min=16, max=256)
    max_image_pixels: int = opt(100_000_000, help="images declaring more pixels than this (width x height, read "
                                "from the header before decoding) are skipped and reported: decompression bombs",
                                min=1)
    workers: int = opt(0, help="decode/hash worker processes; 0 = all cores", min=0, hashed=False)

    def check(self) -> None:
        if not RECORDS[self.dataset].embedded and not self.source:
            raise ConfigError(f"config field 'source' is required for dataset '{self.dataset}': pass --source URI")
        for name in ("train_split", "test_split"):
            value = getattr(self, name)
            if not value.strip() or "/" in value or value.strip() in (".", ".."):
                raise ConfigError(f"config field '{name}' = {value!r}: must name one split folder")
        if self.train_split == self.test_split:
            raise ConfigError(f"config fields 'train_split' and 'test_split' are both {self.train_split!r}: "
                              f"evaluating on the training images; name two different split folders")


@dataclass(kw_only=True)
class ModelInitConfig:
    """Write a random-weight model of a preset architecture, with a working tokenizer and image processor."""

    preset: str = opt("tiny", help="architecture preset: LLaVA (tiny, llava-1.5-7b) or open_clip CLIP (clip-tiny, "
                      "clip-vit-l-14-336)", choices=("tiny", "llava-1.5-7b", "clip-tiny", "clip-vit-l-14-336"))
    out: str = opt(help="output folder URI")
    seed: int = opt(0, help="seed for the random weights", min=0)
    dtype: str = opt("auto", help="weight dtype written; auto = bfloat16 for llava-1.5-7b (as released), float32 "
                     "otherwise", choices=("auto", "float32", "bfloat16", "float16"))


@dataclass(kw_only=True)
class FinetuneConfig:
    """Fine-tune LLaVA-1.5 on a prep output: projector only, full LLM + projector, or LoRA + projector."""

    # Raised when the code changes what the same fields produce, so config_hash changes and old outputs re-run.
    RESULT_VERSION: ClassVar[int] = 2

    model: str = opt(help="base model URI (HF or original LLaVA layout, or a model-init output) or hf:// origin",
                     input=True, fetch="llava")
    data: str = opt(help="prep output URI", input=True)
    out: str = opt(help="output folder URI")
    strategy: str = opt("projector", help="what trains", choices=STRATEGIES)
    conv: str = opt("v1", help="conversation format: v1 = LLaVA's vicuna_v1 with the prompt (paper; the released "
                    "finetune_task.sh) or plain (the released pretrain.sh: prompt dropped)", choices=("v1", "plain"))
    global_batch: int | None = opt(None, help=f"global batch; default {_per_strategy(DEFAULT_GLOBAL_BATCH)}", min=1)
    per_device_batch: int | None = opt(None, help="micro-batch per device; default: the largest divisor of "
                                       "global_batch / processes up to max_micro_batch", min=1)
    max_micro_batch: int = opt(16, help="cap of the default micro-batch (the released pretrain.sh ran 32 per device, "
                               "with activation checkpointing, which a cap above 16 turns on by default)", min=1)
    fill: str = opt("masked", help="the epoch's last step, filled up to the global batch with samples from the "
                    "start: masked (they add no loss) or repeat (they count, as accelerate's even_batches in the "
                    "released scripts' HF Trainer)", choices=("masked", "repeat"))
    group_by_length: bool = opt(False, help="each step's micro-batches of similar length, as LLaVA's "
                                "group_by_modality_length (the released code's finetune_task.sh sets it)")
    lr: float | None = opt(None, help=f"learning rate; default {_per_strategy(DEFAULT_LR)}", min=0.0, max=1.0)
    projector_lr: float | None = opt(None, help=f"projector lr for lora (default {_short(DEFAULT_PROJECTOR_LR)})",
                                     min=0.0, max=1.0)
    weight_decay: float = opt(0.0, help="AdamW weight decay", min=0.0, max=1.0)
    warmup_ratio: float = opt(0.03, help="linear warmup fraction of steps", min=0.0, max=1.0)
    epochs: float = opt(1.0, help="epochs over the train split", min=0.0)
    max_steps: int | None = opt(None, help="stop after N optimizer steps (smoke runs, benchmarks)", min=1)
    seed: int = opt(0, help="seed (data order, init of new weights)", min=0)
    precision: str = opt("auto", help="auto = bf16 on GPU, fp32 on CPU", choices=("auto", "bf16", "fp32"))
    deepspeed: str = opt("auto", help="auto = ZeRO-2 projector, ZeRO-3 full/lora when distributed on GPU; "
                         "full on one GPU: ZeRO-3 with the optimizer offloaded to the CPU",
                         choices=("auto", "none", "zero2", "zero3", "zero3-offload"))
    max_grad_norm: float = opt(0.0, help="clip gradients to this global norm; 0 = off, as the released scripts ran "
                               "(their DeepSpeed configs set no gradient_clipping, which their DeepSpeed read as 0)",
                               min=0.0)
    loss_normalization: str = opt("micro-batch", help="micro-batch = the mean over micro-batches (all devices and "
                                  "accumulation steps) of each micro-batch's mean token loss, as the HF Trainer of "
                                  "the released scripts; global-batch = the mean over every answer token of the global "
                                  "batch (the same result for any micro-batch size and GPU count)",
                                  choices=("micro-batch", "global-batch"))
    gradient_checkpointing: bool | None = opt(None, help="activation checkpointing in the LLM; default: on for "
                                              "full/lora (as the released scripts), off for projector, whose "
                                              "activations fit (no recomputation); the same result either way",
                                              hashed=False)
    checkpoint_layers: int | None = opt(None, help="with checkpointing on, checkpoint only the first N decoder "
                                        "layers (default: all); fewer recomputations where memory allows", min=0,
                                        hashed=False)
    fp8: bool = opt(False, help="FP8 matmuls for the frozen LLM (projector strategy) on GPUs with FP8 tensor "
                    "cores (compute capability 8.9+), results at FP8 precision")
    fp8_backward: bool = opt(False, help="FP8 only for the input-gradient matmuls through the frozen LLM "
                             "(projector strategy): the forward and every loss stay bf16, the gradients carry "
                             "FP8 rounding; implied by fp8")
    compile: bool = opt(True, help="torch.compile each decoder/encoder layer on GPUs (same results at bf16 "
                        "precision, faster steps once compiled; CPU runs stay eager)", hashed=False)
    shared_prefix: bool = opt(True, help="projector strategy: the tokens before the image (the same in every "
                              "example) run once per run without gradient, and the last LLM layer only where the "
                              "loss reads it; the same result, less work", hashed=False)
    compile_cache: str | None = compile_cache_opt()
    cast_on_gpu: bool = opt(True, help="GPU runs without DeepSpeed: the model moves to the GPU in its stored "
                            "dtype and the trained weights become fp32 there, not on the CPU first (the same "
                            "weights, half the bytes to move)", hashed=False)
    model_max_length: int = opt(2048, help="truncate sequences to this many tokens", min=16)
    image_aspect_ratio: str = opt("pad", help="pad to square with the CLIP mean (LLaVA-1.5) or square crop",
                                  choices=("pad", "square"))
    image_backend: str = image_backend_opt()
    lora_r: int = opt(128, help="LoRA rank", min=1)
    lora_alpha: int = opt(256, help="LoRA alpha", min=1)
    lora_dropout: float = opt(0.05, help="LoRA dropout", min=0.0, max=1.0)
    checkpoint_every: int = opt(200, help="checkpoint every N optimizer steps (and at the end)", min=1,
                                hashed=False)
    keep_checkpoints: int = opt(2, help="checkpoints kept", min=1, hashed=False)
    save_checkpoints: bool = opt(True, help="write resumable checkpoints; off for benchmarks (a 7B full-model "
                                 "checkpoint holds the fp32 weights and optimizer state)", hashed=False)
    log_every: int = opt(10, help="log a progress line every N steps", min=1, hashed=False)
    workers: int = opt(2, help="dataloader workers", min=0, hashed=False)
    tensorboard: bool = tensorboard_opt()
    mlflow_uri: str | None = mlflow_uri_opt()
    mlflow_experiment: str = mlflow_experiment_opt()
    wandb_project: str | None = wandb_project_opt()


@dataclass(kw_only=True)
class MergeConfig:
    """Write an HF-layout model: the base with a tuned projector (the released code's update_model.sh, done right)."""

    base: str = opt(help="base model URI or hf:// origin", input=True, fetch="llava")
    projector: str = opt(help="finetune output URI (projector strategy) or a mm_projector.bin/safetensors URI",
                         input=True)
    out: str = opt(help="output folder URI")
    reuse_base: bool = opt(True, help="base is an HF-layout stage output: rewrite only the weights file holding the "
                           "projector and reuse every other file of the base (hard links locally, server-side "
                           "copies in an object store, the base's recorded hashes); the same model folder",
                           hashed=False)


@dataclass(kw_only=True)
class EvalClipConfig:
    """CLIP zero-shot classification of a prepared split (Table 1's CLIP row)."""

    RESULT_VERSION: ClassVar[int] = 1  # images turned upright by their EXIF orientation, as the released pipeline

    model: str = opt(help="CLIP weights URI (open_clip or HF CLIP layout), a model-init output or hf:// origin",
                     input=True, fetch="clip")
    data: str = opt(help="prep output URI", input=True)
    out: str = opt(help="output folder URI")
    protocol: str = opt("paper", help="paper = 'This is a photo of {}.' on lower-cased labels; openclip = "
                        "open_clip's template ensemble", choices=("paper", "openclip"))
    arch: str = opt("ViT-L-14-336", help="open_clip architecture name when the URI holds bare weights")
    split: str = opt("test", help="split evaluated", choices=("train", "test"))
    decode: str = decode_opt()
    precision: str = opt("fp32", help="image tower weights and activations: fp32 (the released code's) or bf16 (text "
                         "embeddings stay fp32)", choices=("fp32", "bf16"))
    fast_tower: bool = opt(True, help="the image tower as mysproj's own functions over the model's weights (same "
                           "arithmetic, no attention layout copies, the last block at the class token only); "
                           "false = the model's encode_image", hashed=False)
    compile: bool = opt(False, help="torch.compile each image-tower transformer block, compiled once (a last "
                        "partial batch is padded to batch_size)", hashed=False)
    compile_cache: str | None = compile_cache_opt()
    batch_size: int = opt(128, help="images per batch", min=1, hashed=False)
    workers: int = opt(-1, help="decode worker processes; -1 = one per available core (at most 16), 0 = none",
                       min=-1, hashed=False)
    tensorboard: bool = tensorboard_opt()
    mlflow_uri: str | None = mlflow_uri_opt()
    mlflow_experiment: str = mlflow_experiment_opt()
    wandb_project: str | None = wandb_project_opt()


@dataclass(kw_only=True)
class EvalLlavaConfig:
    """LLaVA-1.5 classification of a prepared split with the training prompt (generate + parse, or scoring)."""

    # 2: prompt ids as tokenizer_image_token builds them; fine-tuned models. 3: stop (auto: a line break ends the
    # answers of a conv=plain fine-tune)
    RESULT_VERSION: ClassVar[int] = 3

    model: str = opt(help="LLaVA model URI (HF or original layout, merge/finetune output) or hf:// origin",
                     input=True, fetch="llava")
    data: str = opt(help="prep output URI", input=True)
    out: str = opt(help="output folder URI")
    mode: str = opt("generate", help="generate = decoded answer + parser (paper); scoring = rank classes by "
                    "log-likelihood", choices=("generate", "scoring"))
    split: str = opt("test", help="split evaluated", choices=("train", "test"))
    max_new_tokens: int = opt(32, help="generation budget (the released code's cli.py: 512)", min=1, max=2048)
    temperature: float = opt(0.0, help="generate mode: 0 = greedy (paper protocol); > 0 samples at this "
                             "temperature, seeded by seed (the released cli.py: 0.2, top-k 50)", min=0.0, max=10.0)
    top_p: float | None = opt(None, help="sampling: nucleus mass kept; unset = 1.0 (cli.py passes none)",
                              min=0.0, max=1.0)
    seed: int = opt(0, help="sampling: seed of the draws (each batch from seed and its first example, so the same "
                    "draws for the same batch_size)", min=0)
    stop: str = opt("auto", help="where an answer ends besides </s>: newline = at its first line break after some "
                    "text (answers of a conv=plain fine-tune end with \\n); auto = newline for a model fine-tuned "
                    "with conv=plain, else eos", choices=("auto", "eos", "newline"))
    close_match: float = opt(0.8, help="difflib ratio for the parser's close match", min=0.0, max=1.0)
    limit: int | None = opt(None, help="evaluate the first N examples only (smoke runs)", min=1)
    image_aspect_ratio: str = opt("pad", help="pad to square with the CLIP mean (LLaVA-1.5) or square crop",
                                  choices=("pad", "square"))
    image_backend: str = image_backend_opt()
    decode: str = decode_opt()
    precision: str = opt("auto", help="auto = fp16 on GPU (LLaVA's own inference), fp32 on CPU",
                         choices=("auto", "bf16", "fp16", "fp32"))
    fp8: bool = opt(False, help="FP8 matmuls for the LLM's Linear layers on GPUs with FP8 tensor cores (compute "
                    "capability 8.9+), results at FP8 precision")
    compile: bool = opt(True, help="torch.compile each decoder/encoder layer on GPUs, scoring mode (same "
                        "predictions, faster once compiled; CPU runs and generate stay eager)", hashed=False)
    shared_prefix: bool = opt(True, help="scoring mode: the system prompt's keys and values once per run, the "
                              "last LLM layer only where scores are read (the same scores, less work)",
                              hashed=False)
    static_decode: bool = opt(True, help="generate mode: mysproj's own greedy loop (the system prompt's keys and "
                              "values once per run, a KV cache of fixed size written in place, finished rows "
                              "dropped) instead of transformers' generate; the same tokens", hashed=False)
    cuda_graphs: bool = opt(True, help="generate mode with static_decode, on GPUs: each decode step recorded once "
                            "as a CUDA graph and replayed (the same kernels as eager, so the same tokens)",
                            hashed=False)
    compile_prefill: bool = opt(False, help="generate mode with static_decode, on GPUs: torch.compile the prefill's "
                                "layer functions (faster prefill; compiled kernels round differently in the last "
                                "bit, which can change greedy answers)", hashed=False)
    compile_cache: str | None = compile_cache_opt()
    direct_load: bool = direct_load_opt()
    batch_size: int = opt(32, help="images per batch", min=1, hashed=False)
    workers: int = opt(-1, help="decode worker processes; -1 = one per available core (at most 16), 0 = none",
                       min=-1, hashed=False)
    tensorboard: bool = tensorboard_opt()
    mlflow_uri: str | None = mlflow_uri_opt()
    mlflow_experiment: str = mlflow_experiment_opt()
    wandb_project: str | None = wandb_project_opt()


@dataclass(kw_only=True)
class ProbeConfig:
    """Pre/post-projection feature probes: the paper's MLPs on vision-tower and projector features."""

    RESULT_VERSION: ClassVar[int] = 2  # both pre-projection vectors probed (pre_cls, pre_mean)

    model: str = opt(help="LLaVA model URI (or hf:// origin) whose vision tower and projector give the features",
                     input=True, fetch="llava")
    data: str = opt(help="prep output URI", input=True)
    out: str = opt(help="output folder URI")
    protocol: str = opt("paper", help="paper = Adam 1e-4, batch 128, early stopping; code = released script "
                        "(Adam 1e-3, batch 32, 100 epochs)", choices=("paper", "code"))
    pre_pooling: str = opt("cls", help="the headline pre-projection vector (both are probed): cls = CLIP's pooled "
                           "image representation (post-LayerNorm CLS, A.3's 'image embeddings'), mean = mean of the "
                           "layer -2 patch features the projector consumes", choices=("cls", "mean"))
    seed: int = opt(0, help="seed for the MLP init and the validation split", min=0)
    val_fraction: float = opt(0.1, help="paper protocol: train share held out for early stopping",
                              min=0.0, max=0.5)
    patience: int = opt(5, help="paper protocol: early-stopping patience (epochs)", min=1)
    max_epochs: int = opt(100, help="epoch cap (code protocol: exactly this many)", min=1)
    image_aspect_ratio: str = opt("pad", help="pad to square with the CLIP mean (LLaVA-1.5) or square crop",
                                  choices=("pad", "square"))
    image_backend: str = image_backend_opt()
    decode: str = decode_opt()
    precision: str = opt("auto", help="feature extraction: auto = fp16 on GPU, fp32 on CPU",
                         choices=("auto", "bf16", "fp16", "fp32"))
    direct_load: bool = direct_load_opt()
    vision_only: bool = opt(True, help="load only the vision tower and projector (from a model stage output in HF "
                            "layout): the language model's weights are never fetched, verified or read; the same "
                            "features", hashed=False)
    batch_size: int = opt(32, help="feature-extraction batch", min=1, hashed=False)
    workers: int = opt(-1, help="decode worker processes; -1 = one per available core (at most 16), 0 = none",
                       min=-1, hashed=False)
    tensorboard: bool = tensorboard_opt()
    mlflow_uri: str | None = mlflow_uri_opt()
    mlflow_experiment: str = mlflow_experiment_opt()
    wandb_project: str | None = wandb_project_opt()


@dataclass(kw_only=True)
class ReportConfig:
    """report.md (the paper's Tables 1-3 beside ours), results.parquet and plots from finished runs."""

    runs: list[str] = opt(help="pipeline root URIs (or stage outputs) to gather", default_factory=list, input=True,
                          holds_out=True)
    out: str = opt(help="output folder URI")
    mlflow_uri: str | None = mlflow_uri_opt()
    mlflow_experiment: str = mlflow_experiment_opt()

    def check(self) -> None:
        if not self.runs:
            raise ConfigError("config field 'runs' is empty: pass --runs URI[,URI...]")


register_config_classes(*(c for c in list(globals().values()) if isinstance(c, type) and dataclasses.is_dataclass(c)))
