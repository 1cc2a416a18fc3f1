"""Filesystems: local paths and object-store URIs (``s3://``, ``gs://``, ``hdfs://``...) through
``pyarrow.fs``, plus the one thing pyarrow cannot do: create an S3 object only if its key is
free (a conditional PUT, ``If-None-Match: *``, through boto3), which makes a commit record
"first writer wins" on S3 (``storage.writer``)."""

from __future__ import annotations

import os
import time
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


def join(location: str | os.PathLike, *parts: str) -> str:
    """``location`` with ``parts`` appended to its path; a URI keeps its query (``?endpoint_override=...``)."""
    base, sep, query = str(location).partition("?")
    return "/".join([base.rstrip("/"), *parts]) + sep + query


def display(location: str | os.PathLike) -> str:
    """``location`` as errors and logs name it: a URI's query (which may carry credentials) dropped."""
    return str(location).split("?", 1)[0]


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


PART_BYTES = 64 << 20  # multipart part size for conditional uploads (S3 allows 10,000 parts: 640 GB)


def has_conditional_put(fs: pafs.FileSystem | None) -> bool:
    """Whether ``put_if_absent`` works on ``fs`` (S3 and S3-compatible stores)."""
    return fs is not None and fs.type_name == "s3"


_S3_CLIENTS: dict[tuple, object] = {}


def _s3_client(fs: pafs.S3FileSystem):
    """A boto3 client for the same endpoint, region and credentials as ``fs`` (one per
    process and settings: building one takes about 15 ms, and clients do not survive a fork)."""
    # the options pyarrow pickles an S3FileSystem with: the only public view of its settings
    opts = fs.__reduce__()[1][0]
    cache_key = (os.getpid(), repr(sorted(opts.items())))
    if cache_key not in _S3_CLIENTS:
        _S3_CLIENTS[cache_key] = _new_s3_client(opts)
    return _S3_CLIENTS[cache_key]


def _new_s3_client(opts: dict):
    try:
        import boto3
        from botocore import UNSIGNED
        from botocore.config import Config
    except ImportError as e:
        raise ImportError(
            "committing shards to s3:// needs boto3 (for a conditional PUT, which pyarrow lacks): "
            "pip install 'offline-distill[s3]'"
        ) from e
    endpoint = opts.get("endpoint_override") or None
    if endpoint and "://" not in endpoint:
        endpoint = f"{opts.get('scheme') or 'https'}://{endpoint}"
    # pyarrow addresses buckets by path when an endpoint is given (S3-compatible servers)
    style = "virtual" if opts.get("force_virtual_addressing") or not endpoint else "path"
    config = Config(s3={"addressing_style": style}, signature_version=UNSIGNED if opts.get("anonymous") else None)
    return boto3.session.Session().client(  # the default session is not thread-safe
        "s3",
        region_name=opts.get("region") or None,
        endpoint_url=endpoint,
        config=config,
        aws_access_key_id=opts.get("access_key") or None,
        aws_secret_access_key=opts.get("secret_key") or None,
        aws_session_token=opts.get("session_token") or None,
        verify=opts.get("tls_ca_file_path") or None,
    )


def _error_code(e: Exception) -> tuple[str, int]:
    response = getattr(e, "response", None) or {}
    return response.get("Error", {}).get("Code", ""), response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def put_if_absent(fs: pafs.FileSystem, path: str, source: Path | bytes, retries: int = 5) -> bool:
    """Create object ``path`` from a local file or bytes only if no object has that key.

    True: created. False: the key exists (HTTP 412), nothing was written. A 409 (S3 reports
    concurrent conditional writes of one key that way) is retried with a short backoff. Files
    above ``PART_BYTES`` go up as a multipart upload whose completion carries the condition.
    """
    if not has_conditional_put(fs):
        raise NotImplementedError(f"{fs.type_name} has no conditional put in this code (S3 only)")
    from botocore.exceptions import ClientError

    client = _s3_client(fs)
    bucket, key = path.split("/", 1)
    for attempt in range(retries):
        try:
            if isinstance(source, bytes):
                client.put_object(Bucket=bucket, Key=key, Body=source, IfNoneMatch="*")
            elif Path(source).stat().st_size <= PART_BYTES:
                with open(source, "rb") as f:
                    client.put_object(Bucket=bucket, Key=key, Body=f, IfNoneMatch="*")
            else:
                _multipart_if_absent(client, bucket, key, Path(source))
            return True
        except ClientError as e:
            code, status = _error_code(e)
            if status == 412 or code == "PreconditionFailed":
                return False
            if (status == 409 or code == "ConditionalRequestConflict") and attempt + 1 < retries:
                time.sleep(0.05 * 2**attempt)
                continue
            raise
    raise AssertionError("unreachable")


def _multipart_if_absent(client, bucket: str, key: str, source: Path) -> None:
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    try:
        parts = []
        with open(source, "rb") as f:
            while block := f.read(PART_BYTES):
                n = len(parts) + 1
                etag = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=block)["ETag"]
                parts.append({"PartNumber": n, "ETag": etag})
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}, IfNoneMatch="*"
        )
    except BaseException:
        client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        raise
