"""Image decoding shared by prep (checking every file once) and the stages that feed models.

LLaVA-1.5 pads images to a square with the CLIP mean colour before the CLIP processor (`image_aspect_ratio=pad`,
docs/recipe.md); `expand2square` is that step, byte-for-byte the released code's function.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from mysproj.errors import BadInput

if TYPE_CHECKING:
    from PIL import Image

# CLIP's per-channel mean; LLaVA fills the padding with it scaled to 0..255 -> (122, 116, 104).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_MEAN_RGB = tuple(int(x * 255) for x in CLIP_MEAN)

# Decompression-bomb guard: an image declaring more pixels than this in its header is refused before it is
# decoded (prep's `max_image_pixels` sets it for a dataset; PreparedData passes prep's value on).
DEFAULT_MAX_PIXELS = 100_000_000


class BadImage(BadInput):
    """A file that does not decode to an image (corrupt, truncated, or not an image at all)."""


def _pil():
    # PIL's own guard only raises at twice its limit and only warns below; `open_rgb` checks the header
    # against an exact limit itself, before any pixel is decoded.
    Image.MAX_IMAGE_PIXELS = None
    return Image


def too_large(width: int, height: int, max_pixels: int) -> str | None:
    if width * height <= max_pixels:
        return None
    return (f"too large ({width}x{height} = {width * height / 1e6:.0f} MP declared in its header, above the limit "
            f"of {max_pixels / 1e6:g} MP, max_image_pixels); not decoded")


def open_rgb(source: str | bytes | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS,
             name: str | None = None) -> Image.Image:
    """Fully decode a path or raw bytes into an RGB image; raise `BadImage` naming why it failed (`name`, else the
    path, names the file in the message). Images above `max_pixels` are refused from their header alone."""
    Image = _pil()
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with fp, Image.open(fp) as img:
            bomb = too_large(*img.size, max_pixels)  # Image.open has read the header only
            if bomb:
                raise BadImage(f"{name}: {bomb}")
            img.load()  # truncated data fails here
            return to_rgb(img)
    except FileNotFoundError:
        raise BadImage(f"{name}: no such file (deleted or moved?); restore it or correct the path") from None
    except IsADirectoryError:
        raise BadImage(f"{name}: is a folder, not an image file") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name}: not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"{name}: corrupt image ({type(e).__name__}: {e})") from None


def to_rgb(img):
    """8-bit RGB of an image of any mode. `convert("RGB")` alone clips 16-bit and 32-bit greyscale to white and
    float images (0..1) to black; those are scaled to 0..255 here (16-bit and 32-bit integers from 0..65535, floats
    from 0..1 where they lie in it). Transparent pixels (RGBA, LA, a palette with transparency) are composited onto
    white instead of showing whatever colour they hide."""

    Image = _pil()
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        values = np.asarray(img, dtype=np.float64)
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        top = float(values.max()) if values.size else 0.0
        if img.mode == "F" and top <= 1.0:
            values = values * 255.0
        elif top > 255.0:
            values = values / 257.0
        grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def expand2square(img, background=CLIP_MEAN_RGB):
    """Pad to a square, image centred, as LLaVA's `expand2square`."""
    width, height = img.size
    if width == height:
        return img
    Image = _pil()
    side = max(width, height)
    result = Image.new(img.mode, (side, side), background)
    result.paste(img, ((side - width) // 2, 0) if width < height else (0, (side - height) // 2))
    return result


@dataclass(frozen=True)
class ImageCheck:
    """What prep learns about one file: its hash and size, or why it cannot be used."""
    sha256: str | None
    width: int | None
    height: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def check_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageCheck:
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageCheck(sha, None, None, "empty file")
    try:
        img = open_rgb(data, max_pixels=max_pixels)
    except BadImage as e:
        return ImageCheck(sha, None, None, str(e).split(": ", 1)[1])
    return ImageCheck(sha, img.width, img.height)


def exif_orientation(raw: bytes) -> int:
    """The EXIF orientation tag of an encoded image (1 = upright, also for files without one), from its header."""
    Image = _pil()
    try:
        with Image.open(io.BytesIO(raw)) as img:
            return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # an unreadable header: the decoder reports the file, not this check
        return 1


class ExifUpright:
    """A transform applied after `ImageOps.exif_transpose`: the image as a camera's orientation tag says to show
    it, as transformers' `load_image` (the released code's CLIP zero-shot pipeline) loads it. LLaVA's own loading
    (`Image.open(...).convert('RGB')`) does not, so only CLIP zero-shot uses this."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(ImageOps.exif_transpose(img))
