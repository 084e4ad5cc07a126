"""Image decoding shared by prep (checking every file once) and the stages that feed models.

LLaVA-1.5 pads images to a square with the CLIP mean colour before the CLIP processor (`image_aspect_ratio=pad`,
spec §6.8); `expand2square` is that step, byte-for-byte the upstream function.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mysproj.errors import BadInput

if TYPE_CHECKING:
    from PIL import Image

# CLIP's per-channel mean; LLaVA fills the padding with it scaled to 0..255 -> (122, 116, 104).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_MEAN_RGB = tuple(int(x * 255) for x in CLIP_MEAN)

# Files with these extensions are expected to be images; anything else is still tried, and reported if it
# does not decode ("not an image").
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")

# Decompression-bomb guard: larger images are reported, not decoded.
MAX_PIXELS = 20_000 * 20_000


class BadImage(BadInput):
    """A file that does not decode to an image (corrupt, truncated, or not an image at all)."""


def _pil():
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    return Image


def open_rgb(source: str | bytes | os.PathLike) -> Image.Image:
    """Fully decode a path or raw bytes into an RGB image; raise `BadImage` naming why it failed."""
    Image = _pil()
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
        with fp, Image.open(fp) as img:
            img.load()  # Image.open only reads the header; truncated data fails here
            return img.convert("RGB")
    except FileNotFoundError:
        raise BadImage(f"{name}: no such file") from None
    except Image.UnidentifiedImageError:
        raise BadImage(f"{name}: not an image (unknown format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise BadImage(f"{name}: corrupt image ({type(e).__name__}: {e})") from None


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


def check_bytes(data: bytes) -> ImageCheck:
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return ImageCheck(sha, None, None, "empty file")
    try:
        img = open_rgb(data)
    except BadImage as e:
        return ImageCheck(sha, None, None, str(e).split(": ", 1)[1])
    return ImageCheck(sha, img.width, img.height)
