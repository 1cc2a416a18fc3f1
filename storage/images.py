"""Content-addressed images: each image a corpus uses is checked once, stored under the sha256 of
its bytes (``<root>/<hash[:2]>/<hash>``), and named by that hash in every corpus and label row,
so labels, training and evaluation read the exact bytes the teacher saw, and the same image in
two datasets is stored once.

Checks happen before any teacher work, with errors that name where the image came from: bytes
that are not an image, a truncated file, and an image above ``max_pixels`` (decoding a huge or
malicious image would take the machine's memory). PIL is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

from storage.writer import temp_name


class ImageError(ValueError):
    """An image cannot be used: not an image, truncated, too large, or missing from the store."""


def check_image(data: bytes, where: str, max_pixels: int):
    """The RGB image ``data`` holds, fully decoded; ``ImageError`` naming ``where`` otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ImageError(f"{where}: empty image file")
    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only: the size before any decoding
            width, height = probe.size
            if width * height > max_pixels:
                raise ImageError(
                    f"{where}: image of {width}x{height} = {width * height} pixels exceeds corpus.max_image_pixels="
                    f"{max_pixels}; resize it or raise the limit"
                )
            probe.verify()
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # a truncated file fails here ("image file is truncated")
            return image.convert("RGB")
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{where}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError(f"{where}: unreadable image ({type(e).__name__}: {e})") from None


def image_bytes(value, where: str) -> bytes:
    """The encoded bytes of an image as a dataset holds it: a path (str), a ``datasets`` Image
    value (``{"bytes", "path"}``) or a PIL image (re-encoded as PNG)."""
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (str, os.PathLike)):
        try:
            return Path(value).read_bytes()
        except OSError as e:
            raise ImageError(f"{where}: cannot read image file {value} ({e.strerror or e})") from None
    if hasattr(value, "save") and hasattr(value, "size"):  # a PIL image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    raise ImageError(f"{where}: {type(value).__name__} is not an image (expected a path, image bytes or a PIL image)")


class ImageStore:
    """Images under ``root`` by the sha256 of their bytes."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        """Store ``data`` (once) and return its hash; written to a temporary name, then renamed."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = temp_name(path)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        return digest

    def open(self, digest: str):
        """The stored image as RGB; ``ImageError`` when it is missing or its bytes no longer hash to ``digest``."""
        path = self.path(digest)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(
                f"{path}: image {digest} is not in the image store {self.root}; rebuild the corpus (materialize the "
                "corpus asset)"
            ) from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ImageError(f"{path}: the stored bytes no longer hash to {digest}; delete it and rebuild the corpus")
        return check_image(data, str(path), max_pixels=2**31)
