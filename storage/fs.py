"""Filesystems: local paths and object-store URIs (``s3://``, ``gs://``, ``hdfs://``...) through
``pyarrow.fs``. Local writes commit by rename; on object stores a single PUT is atomic, and
the commit record is written last."""
from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs


def is_uri(location: str | os.PathLike) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def resolve(location: str | os.PathLike) -> tuple[pafs.FileSystem | None, str]:
    """``(filesystem, path)`` for a URI, or ``(None, local path)`` for a local location."""
    if is_uri(location):
        fs, path = pafs.FileSystem.from_uri(str(location))
        return fs, path.rstrip("/")
    return None, str(Path(str(location).removeprefix("file://")).expanduser())


def exists(fs: pafs.FileSystem | None, path: str) -> bool:
    if fs is None:
        return Path(path).exists()
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def size(fs: pafs.FileSystem | None, path: str) -> int:
    if fs is None:
        return Path(path).stat().st_size
    return fs.get_file_info(path).size


def read_bytes(fs: pafs.FileSystem | None, path: str) -> bytes:
    if fs is None:
        return Path(path).read_bytes()
    with fs.open_input_stream(path) as f:
        return f.read()


def open_input(fs: pafs.FileSystem | None, path: str):
    return open(path, "rb") if fs is None else fs.open_input_file(path)


def upload(local: Path, fs: pafs.FileSystem, path: str, chunk: int = 1 << 24) -> None:
    """Copy a local file to one object (a single atomic object on S3 and GCS)."""
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        while block := src.read(chunk):
            dst.write(block)


def delete(fs: pafs.FileSystem | None, path: str) -> None:
    if fs is None:
        Path(path).unlink(missing_ok=True)
    elif exists(fs, path):
        fs.delete_file(path)
