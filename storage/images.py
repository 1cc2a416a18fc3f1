"""Content-addressed images: each image a corpus uses is checked once, stored under the sha256 of
its bytes (``<root>/<hash[:2]>/<hash>``), and named by that hash in every corpus and label row,
so labels, training and evaluation read the exact bytes the teacher saw, and the same image in
two datasets is stored once. A store is a local folder or an object-store URI: label shards
written to ``labels_uri`` get their images copied beside them (``<labels_uri>/images``) before
they are committed, so machines that train from those labels find every image they name.

Checks happen before any teacher work, with errors that name where the image came from: bytes
that are not an image, a truncated file, and an image above ``max_pixels`` (decoding a huge or
malicious image would take the machine's memory). PIL is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from storage import fs as fsmod
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
    """Images under ``location`` by the sha256 of their bytes: a local folder, or an object-store
    URI (``s3://bucket/prefix/images``, pyarrow URI options such as ``?endpoint_override=`` work),
    where label shards that name the images live beside them for other machines to train on."""

    def __init__(self, location: str | os.PathLike):
        self.location = str(location)
        self.fs, base = fsmod.resolve(location)
        self.root = Path(base)

    @property
    def display_location(self) -> str:
        """The location as errors name it: a URI's query (which may carry credentials) dropped."""
        return fsmod.display(self.location)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def where(self, digest: str) -> str:
        """Where ``digest`` is stored, as errors name it."""
        return str(self.path(digest)) if self.fs is None else f"{self.display_location}/{digest[:2]}/{digest}"

    def has(self, digest: str) -> bool:
        return fsmod.exists(self.fs, str(self.path(digest)))

    def put(self, data: bytes) -> str:
        """Store ``data`` (once) and return its hash."""
        digest = hashlib.sha256(data).hexdigest()
        if not self.has(digest):
            self._write(digest, data)
        return digest

    def _write(self, digest: str, data: bytes) -> None:
        """Locally to a temporary name, then renamed; in an object store one object, which appears
        whole or not at all. A key always holds the same bytes, so racing writers all win."""
        path = self.path(digest)
        if self.fs is not None:
            with self.fs.open_output_stream(str(path)) as out:
                out.write(data)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(path)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def read(self, digest: str) -> bytes:
        """The stored bytes of ``digest``, checked against it; ``ImageError`` when missing or changed."""
        where = self.where(digest)
        try:
            data = fsmod.read_bytes(self.fs, str(self.path(digest)))
        except FileNotFoundError:
            fix = (
                "rebuild the corpus (materialize the corpus asset)"
                if self.fs is None
                else "it was stored before the label shards that name it were committed, and deleted since: copy it "
                "back, or delete those shards and label them again"
            )
            missing = f"{where}: image {digest} is not in the image store {self.display_location}"
            raise ImageError(f"{missing}; {fix}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ImageError(f"{where}: the stored bytes no longer hash to {digest}; delete it and store it again")
        return data

    def open(self, digest: str):
        """The stored image as RGB; ``ImageError`` when it is missing or its bytes no longer hash to ``digest``."""
        return check_image(self.read(digest), self.where(digest), max_pixels=2**31)

    def copy_from(self, source: ImageStore, digests, workers: int = 16) -> int:
        """Store every image of ``digests`` that this store lacks, read (and checked) from
        ``source``; returns how many were copied. ``workers`` threads at once: on an object store
        each image is a round trip or two (is it there? put it)."""

        def copy(digest: str) -> bool:
            if self.has(digest):
                return False
            self._write(digest, source.read(digest))
            return True

        with ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(copy, sorted(set(digests))))
