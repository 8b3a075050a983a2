"""URIs for local paths and `s3://` buckets, behind one small API built on `pyarrow.fs`.

Every stage reads and writes through these helpers, so the same code runs on a laptop (plain paths)
and on a cluster (S3). The S3 endpoint and credentials come from the standard AWS environment
(`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION` or `AWS_REGION`), read when a filesystem is built, never at import time.

The filesystem is built with the endpoint and keys spelled out (not `S3FileSystem()`, which ignores
`AWS_ENDPOINT_URL`), so a pickled filesystem sent to a Ray task carries them: workers of a cluster
started before the variables were set still reach the same endpoint.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

S3_SCHEME = "s3://"


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_SCHEME)


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(uri):
        return posixpath.join(str(uri).rstrip("/"), *parts)
    return str(Path(uri, *parts))


def normalize(uri: str | Path) -> str:
    """Absolute local path (Ray workers do not share the driver's cwd) or the s3:// URI unchanged."""
    uri = str(uri)
    if is_s3(uri):
        return uri.rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return str(Path(uri).expanduser().resolve())


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 filesystem configured from the AWS environment variables (see the module docstring)."""
    kwargs: dict[str, object] = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        kwargs["scheme"] = parsed.scheme
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret, session_token=os.environ.get("AWS_SESSION_TOKEN"))
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem_and_path(uri: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it): `s3://bucket/key` -> (S3, "bucket/key")."""
    uri = normalize(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len(S3_SCHEME):]
    return pafs.LocalFileSystem(), uri


def read_bytes(uri: str | Path, filesystem: pafs.FileSystem | None = None) -> bytes:
    """The whole file. Raises FileNotFoundError naming the URI if it does not exist."""
    fs, path = _resolve(uri, filesystem)
    try:
        with fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {uri}") from None
    except OSError as error:
        # pyarrow's S3 client reports a missing key as a generic OSError
        if "NoSuchKey" in str(error) or "not found" in str(error).lower() or "does not exist" in str(error):
            raise FileNotFoundError(f"no such file: {uri}") from None
        raise


def write_bytes(uri: str | Path, data: bytes, filesystem: pafs.FileSystem | None = None) -> None:
    """Write a whole file, creating parent directories (a no-op on S3)."""
    fs, path = _resolve(uri, filesystem)
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def read_text(uri: str | Path) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str | Path, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str | Path, filesystem: pafs.FileSystem | None = None) -> bool:
    fs, path = _resolve(uri, filesystem)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under directory `uri` whose names end with `suffix` ([] if none)."""
    base = normalize(uri)
    fs, path = filesystem_and_path(base)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    names = sorted(posixpath.relpath(i.path, path) for i in infos
                   if i.type == pafs.FileType.File and i.path.endswith(suffix))
    return [join(base, name) for name in names]


def delete_dir(uri: str | Path) -> None:
    """Remove a directory and everything under it; nothing happens if it does not exist."""
    fs, path = filesystem_and_path(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def sha256_of(uri: str | Path) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, streamed in 8 MiB chunks."""
    fs, path = filesystem_and_path(uri)
    digest, size = hashlib.sha256(), 0
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _resolve(uri: str | Path, filesystem: pafs.FileSystem | None) -> tuple[pafs.FileSystem, str]:
    """With an explicit filesystem (shipped to a worker), strip the scheme; otherwise build one."""
    if filesystem is None:
        return filesystem_and_path(uri)
    uri = str(uri)
    return filesystem, uri[len(S3_SCHEME):] if is_s3(uri) else uri
