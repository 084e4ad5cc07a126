"""`decode=device` for the stages that feed images to a model (CLIP zero-shot, LLaVA's evaluation and probe):
DataLoader workers only read each image's bytes (sha256-verified, as `PreparedData.open_image`); the main process
decodes a whole batch of JPEGs at once on the model's device (`torchvision.io.decode_jpeg`, nvJPEG on a GPU) and
pads, resizes, crops and normalises it there as tensors, so a probe's 3,760 photos are no longer bound by the host.

    batches = DeviceBatches(data, samples, clip_pixels(clip.preprocess), batch_size=256, workers=8, device="cuda")
    batches = DeviceBatches(data, samples, llava_pixels(processor, "pad"), ...)     # LLaVA's preprocessing
    for pixels, idx in batches: ...          # [n, 3, S, S] float32 on the device, sample indices

The tensor preprocessing reproduces the model's PIL transform (open_clip's, or an HF CLIP processor's) to within
rounding: PIL resamples in two separable passes, horizontal then vertical, rounding and clamping to uint8 after
each; so do we. One 2-D float pass would differ by several levels where bicubic overshoots at edges. LLaVA's
transformers processor with the torchvision backend (its default) is itself a tensor transform: it is run as is on
the decoded images, after the `pad` step (`expand2square`) done on the uint8 tensor.

Only complete 8-bit 3-component Huffman JPEGs go to the device decoder. Anything else (PNG, greyscale, CMYK,
arithmetic-coded, 12-bit, a file without its end marker) is decoded by PIL in the worker exactly as `decode=cpu`
does, so odd or corrupt files succeed or fail the same way in both modes; nvJPEG, unlike PIL, decodes a file cut
short in its entropy-coded data, hence the end-marker check. A file the device decoder still refuses goes through
PIL in the main process.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg

from mysproj.data.images import ExifUpright, exif_orientation, open_rgb
from mysproj.errors import BadInput, worker_errors
from mysproj.evaluation.batches import decode_workers
from mysproj.models.conversation import image_transform

# Frame types nvJPEG and libjpeg decode as PIL does: baseline, extended sequential, progressive (Huffman coded).
DEVICE_SOF_MARKERS = (0xC0, 0xC1, 0xC2)
# Images of one size resized together; bounds the float copies of a batch of large photos.
RESIZE_CHUNK = 32


@dataclass(frozen=True)
class PixelSpec:
    """The model's preprocessing as numbers: shortest side to `resize`, centre crop to `crop` (h, w), then
    (x / 255 - mean) / std per channel."""
    resize: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "bicubic"       # or bilinear
    crop_floor: bool = False    # HF processors floor the crop offset; torchvision rounds it


def pixel_spec(preprocess: Callable) -> PixelSpec:
    """Read the spec off a loaded CLIP's `preprocess` (a torchvision Compose from open_clip, or `load_clip`'s
    wrapper around an HF `CLIPImageProcessor`); `BadInput` if it does something the tensor path does not."""

    if inspect.isfunction(preprocess):
        processor = inspect.getclosurevars(preprocess).nonlocals.get("processor")
        if processor is not None:
            return _hf_spec(processor)
    return _torchvision_spec(preprocess)


def _unsupported(what: str) -> BadInput:
    return BadInput(f"decode=device: the model's preprocessing {what}; the tensor path cannot reproduce it, "
                    f"use decode=cpu")


def _mode(interpolation: int | str) -> str:
    name = str(getattr(interpolation, "value", interpolation)).lower()
    modes = {"bicubic": "bicubic", "bilinear": "bilinear", "3": "bicubic", "2": "bilinear"}
    if name not in modes:
        raise _unsupported(f"resamples with {interpolation}")
    return modes[name]


def _torchvision_spec(preprocess) -> PixelSpec:
    found = {}
    passive = ("MaybeConvertMode", "MaybeToTensor", "ToTensor", "_convert_to_rgb")
    for t in getattr(preprocess, "transforms", None) or [preprocess]:
        if isinstance(t, T.Resize):
            size = t.size[0] if isinstance(t.size, (list, tuple)) and len(t.size) == 1 else t.size
            if not isinstance(size, int) or t.max_size is not None:
                raise _unsupported(f"resizes to {t.size} (max_size {t.max_size}), not the shortest side")
            found["resize"], found["mode"] = size, _mode(t.interpolation)
        elif isinstance(t, T.CenterCrop):
            found["crop"] = tuple(int(x) for x in t.size)
        elif isinstance(t, T.Normalize):
            found["mean"], found["std"] = tuple(t.mean), tuple(t.std)
        elif type(t).__name__ not in passive and getattr(t, "__name__", "") not in passive:
            raise _unsupported(f"has a step {t!r}")
    missing = {"resize", "crop", "mean"} - set(found)
    if missing:
        raise _unsupported(f"has no {', '.join(sorted(missing))} step")
    return _checked(PixelSpec(**found))


def _hf_spec(processor) -> PixelSpec:
    size, crop = processor.size, processor.crop_size
    if not (processor.do_resize and processor.do_center_crop and processor.do_normalize and size["shortest_edge"]):
        raise _unsupported("is not resize-shortest-edge + centre crop + normalise")
    if not processor.do_rescale or abs(processor.rescale_factor - 1 / 255) > 1e-12:
        raise _unsupported(f"rescales by {processor.rescale_factor}")
    return _checked(PixelSpec(int(size["shortest_edge"]), (int(crop["height"]), int(crop["width"])),
                              tuple(processor.image_mean), tuple(processor.image_std), _mode(processor.resample),
                              crop_floor=True))


def _checked(spec: PixelSpec) -> PixelSpec:
    if spec.resize < max(spec.crop):
        raise _unsupported(f"crops {spec.crop} out of a {spec.resize}-pixel short side (padding)")
    return spec


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """torchvision's (and HF's) shortest-side rule: the long side is scaled and truncated."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short


def _offset(size: int, crop: int, floor: bool) -> int:
    return int((size - crop) / 2.0) if floor else int(round((size - crop) / 2.0))


def _resample(x, size: tuple[int, int], mode: str):
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True).clamp_(0, 255).round_()


def resize_crop(x, spec: PixelSpec):
    """[n, 3, h, w] float images (0..255) of one size -> [n, 3, *crop], as PIL + centre crop compute them."""
    h, w = x.shape[-2:]
    new_h, new_w = resized_size(h, w, spec.resize)
    crop_h, crop_w = spec.crop
    if new_w != w:
        x = _resample(x, (h, new_w), spec.mode)
    left = _offset(new_w, crop_w, spec.crop_floor)
    x = x[..., left:left + crop_w]  # the vertical pass works column by column: resample only the kept ones
    if new_h != h:
        x = _resample(x, (new_h, crop_w), spec.mode)
    top = _offset(new_h, crop_h, spec.crop_floor)
    return x[..., top:top + crop_h, :]


def normalise(x, spec: PixelSpec):
    """ToTensor's /255 then Normalize, in the same order of float32 operations."""

    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device)[:, None, None]
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device)[:, None, None]
    return x.div(255).sub_(mean).div_(std)


def preprocess_decoded(images: list, spec: PixelSpec):
    """Decoded [3, h, w] uint8 images (any sizes, one device) -> [n, 3, *crop] float32 model input."""

    out = torch.empty((len(images), 3, *spec.crop), device=images[0].device)
    by_size = defaultdict(list)
    for k, img in enumerate(images):
        by_size[tuple(img.shape[-2:])].append(k)
    for rows in by_size.values():
        for start in range(0, len(rows), RESIZE_CHUNK):
            chunk = rows[start:start + RESIZE_CHUNK]
            x = torch.stack([images[k] for k in chunk]).float()
            out[chunk] = normalise(resize_crop(x, spec), spec)
    return out


@dataclass(frozen=True)
class DevicePixels:
    """One model's preprocessing in both forms. `on_device`: decoded [3, h, w] uint8 images (any sizes, one device)
    -> [n, 3, *crop] float32; `host`: the per-image PIL transform (picklable: it runs in DataLoader workers) for the
    files the device decoder does not take. `upright`: the model's loading turns a photo as its EXIF orientation
    tag says (CLIP zero-shot's does, LLaVA's does not), so a rotated JPEG goes to `host`, which does the same."""
    crop: tuple[int, int]
    on_device: Callable
    host: Callable
    upright: bool


def clip_pixels(preprocess: Callable) -> DevicePixels:
    """A loaded CLIP's `preprocess` on the device (its `PixelSpec`); EXIF orientation applied, as its loading does."""
    spec = pixel_spec(preprocess)
    return DevicePixels(spec.crop, functools.partial(preprocess_decoded, spec=spec), ExifUpright(preprocess), True)


def llava_pixels(processor, aspect: str) -> DevicePixels:
    """LLaVA's `pixel_values` on the device: `pad` (a square filled with the CLIP mean, as `expand2square`) or
    `square`, then the model's image processor: a torchvision-backend one as is on the tensors, a PIL-backend one
    as its `PixelSpec` (PIL's resampling, within rounding)."""
    if aspect not in ("pad", "square"):
        raise ValueError(f"aspect must be 'pad' or 'square', not {aspect!r}")
    crop = (int(processor.crop_size["height"]), int(processor.crop_size["width"]))
    if getattr(processor, "backend", None) == "torchvision":
        process = functools.partial(_processor_on_tensors, processor)
    else:
        process = functools.partial(preprocess_decoded, spec=_hf_spec(processor))
    background = tuple(int(x * 255) for x in processor.image_mean) if aspect == "pad" else None
    return DevicePixels(crop, functools.partial(_padded_then, process, background),
                        image_transform(processor, aspect), False)


def _processor_on_tensors(processor, images: list):
    return processor(images=images, return_tensors="pt")["pixel_values"].float()


def _padded_then(process: Callable, background: tuple | None, images: list):
    return process([pad_square(img, background) for img in images] if background else images)


def pad_square(img, background: tuple):
    """`expand2square` of a [3, h, w] uint8 tensor: the image centred on a square of `background`."""
    _, h, w = img.shape
    if h == w:
        return img
    side = max(h, w)
    out = torch.tensor(background, dtype=img.dtype, device=img.device)[:, None, None].expand(3, side, side).clone()
    top, left = ((side - h) // 2, 0) if w > h else (0, (side - w) // 2)
    out[:, top:top + h, left:left + w] = img
    return out


def is_device_jpeg(raw: bytes) -> bool:
    """A complete 8-bit, 3-component (YCbCr), Huffman-coded JPEG: what the device decoder gets."""
    if len(raw) < 4 or raw[:2] != b"\xff\xd8" or not raw.endswith(b"\xff\xd9"):
        return False
    pos, adobe_transform = 2, None
    while pos + 4 <= len(raw):
        if raw[pos] != 0xFF:
            return False
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = int.from_bytes(raw[pos + 2:pos + 4], "big")
        if marker == 0xEE and raw[pos + 4:pos + 9] == b"Adobe" and length >= 12:
            adobe_transform = raw[pos + 15]  # 0 = RGB stored as is, not YCbCr
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # start of frame
            precision, components = raw[pos + 4], raw[pos + 9]
            return marker in DEVICE_SOF_MARKERS and precision == 8 and components == 3 and adobe_transform != 0
        elif marker == 0xDA:  # a scan before any frame header
            return False
        pos += 2 + length
    return False


def decode_jpegs(blobs: list, device) -> list:
    """[3, H, W] uint8 RGB images on `device`, None for a file the decoder refuses (one bad file fails a
    whole batched call, so the batch is then decoded file by file)."""

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        try:
            return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out = []
            for blob in blobs:
                try:
                    out.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


@dataclass
class EncodedBatch:
    """One DataLoader batch: JPEG files as bytes for the device, everything else already preprocessed by PIL."""
    indices: list[int]          # sample indices, batch order
    jpeg_rows: list[int]        # positions in the batch of the JPEG files
    jpeg_paths: list[str]
    jpeg_sizes: list[int]
    jpeg_bytes: object          # uint8 tensor: the JPEG files concatenated (one shared-memory block per batch)
    pil_rows: list[int]
    pil_pixels: object          # [len(pil_rows), 3, S, S] float32, or None


class EncodedImages:
    """Dataset of (sample index, local path, JPEG bytes or None, PIL-preprocessed pixels or None)."""

    def __init__(self, data, samples, host: Callable, upright: bool):
        self.data, self.samples, self.host, self.upright = data, samples, host, upright

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path = self.data.local_image(self.samples[i])
        with open(path, "rb") as f:
            raw = f.read()
        # a JPEG with an EXIF rotation goes through PIL where the model's loading turns it upright
        if is_device_jpeg(raw) and not (self.upright and exif_orientation(raw) != 1):
            return i, path, raw, None
        return i, path, None, self.host(open_rgb(path))


def collate_encoded(items) -> EncodedBatch:
    jpegs = [(k, path, raw) for k, (_, path, raw, _) in enumerate(items) if raw is not None]
    pil = [(k, px) for k, (_, _, _, px) in enumerate(items) if px is not None]
    blob = bytearray().join(raw for _, _, raw in jpegs)
    return EncodedBatch(indices=[it[0] for it in items], jpeg_rows=[k for k, _, _ in jpegs],
                        jpeg_paths=[p for _, p, _ in jpegs], jpeg_sizes=[len(r) for _, _, r in jpegs],
                        jpeg_bytes=torch.frombuffer(blob, dtype=torch.uint8) if blob else None,
                        pil_rows=[k for k, _ in pil], pil_pixels=torch.stack([px for _, px in pil]) if pil else None)


class DeviceBatches:
    """Iterable of (pixels [n, 3, *crop] float32 on `device`, sample indices), in sample order. Counts how
    many images each decoder took (`device_images`, `pil_images`)."""

    def __init__(self, data, samples, pixels: DevicePixels, *, batch_size: int, workers: int, device: str):
        self.data, self.samples, self.pixels = data, samples, pixels
        self.batch_size, self.workers, self.device = batch_size, decode_workers(workers), device
        self.device_images = self.pil_images = 0

    def __iter__(self) -> Iterator[tuple]:
        # No pin_memory: the JPEG bytes go to the decoder, which stages them in its own pinned buffers.
        images = EncodedImages(self.data, self.samples, self.pixels.host, self.pixels.upright)
        loader = DataLoader(images, batch_size=self.batch_size,
                            shuffle=False, num_workers=self.workers, collate_fn=collate_encoded,
                            prefetch_factor=2 if self.workers else None, pin_memory=False)
        cuda = torch.device(self.device).type == "cuda"
        # On a GPU the batch is decoded and preprocessed on a side stream: its buffers then never reuse memory
        # that kernels still queued on the compute stream (the previous batch's encode) are using.
        side = torch.cuda.Stream(self.device) if cuda else None
        for batch in worker_errors(loader):
            with torch.cuda.stream(side) if cuda else nullcontext():
                pixels = self.decode(batch)
            if cuda:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_stream(side)
                pixels.record_stream(compute)
            yield pixels, batch.indices

    def decode(self, batch: EncodedBatch):
        out = torch.empty((len(batch.indices), 3, *self.pixels.crop), device=self.device)
        rows = list(batch.pil_rows)
        if rows:
            out[rows] = batch.pil_pixels.to(self.device)
        if batch.jpeg_rows:
            blobs = list(torch.split(batch.jpeg_bytes, batch.jpeg_sizes))
            decoded = decode_jpegs(blobs, self.device)
            ok = [k for k, img in enumerate(decoded) if img is not None]
            if ok:
                out[[batch.jpeg_rows[k] for k in ok]] = self.pixels.on_device([decoded[k] for k in ok])
            for k in set(range(len(decoded))) - set(ok):
                out[batch.jpeg_rows[k]] = self.pixels.host(open_rgb(batch.jpeg_paths[k])).to(self.device)
                rows.append(batch.jpeg_rows[k])
        self.pil_images += len(rows)
        self.device_images += len(batch.indices) - len(rows)
        return out
