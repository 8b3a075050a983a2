"""URIs for local paths and `s3://` buckets, behind one small API built on `pyarrow.fs`.

Every stage reads and writes through these helpers, so the same code runs on a laptop (plain paths)
and on a cluster (S3). The S3 endpoint and credentials come from the standard AWS environment
(`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_DEFAULT_REGION` or `AWS_REGION`), read when a filesystem is built, never at import time.

The filesystem is built with the endpoint and keys spelled out (not `S3FileSystem()`, which ignores
`AWS_ENDPOINT_URL`), so a pickled filesystem sent to a Ray task carries them: workers of a cluster
started before the variables were set still reach the same endpoint.

Failures: the AWS SDK inside pyarrow retries transient errors (connection refused or reset,
timeouts, throttling, 5xx) with exponential backoff, `S3_MAX_ATTEMPTS` attempts in all
(`VITPOSE_S3_MAX_ATTEMPTS` overrides it). What then remains is a `StorageError` naming the URI
and the SDK's error code -- never an OSError, because the stages turn OSErrors of single files
into skipped records, and an outage is not bad data. A missing key stays a FileNotFoundError; a
missing bucket is a StorageError.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from vitpose_core.errors import InvalidInputError, StorageError

S3_SCHEME = "s3://"
S3_MAX_ATTEMPTS = 5  # first try + 4 retries: rides out a throttling burst or an endpoint restart
S3_CONNECT_TIMEOUT_S = 10.0


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
    return pafs.S3FileSystem(**kwargs, connect_timeout=S3_CONNECT_TIMEOUT_S,
                             retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=s3_max_attempts()))


def s3_max_attempts() -> int:
    attempts = os.environ.get("VITPOSE_S3_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))
    if not attempts.isdigit() or int(attempts) < 1:
        raise StorageError(f"VITPOSE_S3_MAX_ATTEMPTS must be a whole number >= 1, got {attempts!r}")
    return int(attempts)


_AWS_ERROR = re.compile(r"AWS Error (\w+)")
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")
_HINTS = {  # AWS SDK error code -> what it means here
    "NETWORK_CONNECTION": "the S3 endpoint is unreachable (check AWS_ENDPOINT_URL and the network)",
    "ACCESS_DENIED": "access denied (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy)",
    "INVALID_ACCESS_KEY_ID": "the endpoint does not know the access key (check AWS_ACCESS_KEY_ID)",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match (check AWS_SECRET_ACCESS_KEY)",
    "NO_SUCH_BUCKET": "the bucket does not exist",
    "SLOW_DOWN": "the endpoint kept throttling",
    "THROTTLING": "the endpoint kept throttling",
    "SERVICE_UNAVAILABLE": "the endpoint kept answering 503",
}


@contextlib.contextmanager
def _s3_errors(uri: str | Path) -> Iterator[None]:
    """Turn what S3 raises (OSErrors, after the SDK's retries) into a StorageError naming `uri`.

    FileNotFoundError (a missing key) passes through; local paths keep their OSErrors.
    """
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as error:
        if not is_s3(str(uri)):
            raise
        text = " ".join(str(error).split())
        match = _AWS_ERROR.search(text)
        code = match.group(1) if match else "UNKNOWN"
        if code in ("NO_SUCH_KEY", "RESOURCE_NOT_FOUND"):
            raise FileNotFoundError(f"no such file: {uri}") from None
        hint = _HINTS.get(code, "the S3 request failed")
        status = _HTTP_STATUS.search(text)
        if code == "UNKNOWN" and status and status.group(1) in ("429", "500", "502", "503", "504"):
            # a HEAD answer has no body, so the SDK cannot read an error code out of a throttled HEAD
            hint = f"the endpoint kept answering HTTP {status.group(1)} (throttled or unavailable)"
        # no attempt count here: in a Ray task the filesystem came pickled from the driver, with its settings
        raise StorageError(f"{uri}: {hint}; {code} after the S3 client's retries with backoff: {text}") from None


def _missing(uri: str | Path, filesystem: pafs.FileSystem | None = None) -> FileNotFoundError:
    """FileNotFoundError naming `uri`, or a StorageError if its whole S3 bucket is missing (a wrong URI or
    endpoint, not a missing file of a dataset)."""
    if is_s3(str(uri)):
        bucket = str(uri)[len(S3_SCHEME):].split("/", 1)[0]
        fs = filesystem if filesystem is not None else filesystem_and_path(uri)[0]
        try:
            with _s3_errors(uri):
                bucket_exists = fs.get_file_info(bucket).type != pafs.FileType.NotFound
        except StorageError:  # e.g. allowed to get objects but not to head the bucket: a missing key it is
            bucket_exists = True
        if not bucket_exists:
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist at the S3 endpoint")
    return FileNotFoundError(f"no such file: {uri}")


def refuse_overwriting_inputs(output: str | Path, inputs: list[str | Path | None], flag: str = "--output") -> None:
    """An InvalidInputError if the local path `output` is (or lies inside) one of the local `inputs`: what a
    command writes must never replace what it read (the metrics over the predictions they came from, an
    export over its checkpoint). `flag` names the output in the message."""
    output = Path(output)
    target = output.resolve()
    for item in inputs:
        if item is None or is_s3(str(item)):
            continue
        item = Path(item)
        source = item.resolve()
        if target == source or source in target.parents or (output.exists() and item.exists()
                                                              and output.samefile(item)):
            raise InvalidInputError(f"{flag} {output} would overwrite the input {item}; choose another path")


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
        with _s3_errors(uri), fs.open_input_stream(path) as stream:
            return stream.read()
    except FileNotFoundError:
        raise _missing(uri, filesystem) from None


def write_bytes(uri: str | Path, data: bytes, filesystem: pafs.FileSystem | None = None) -> None:
    """Write a whole file, creating parent directories (a no-op on S3)."""
    fs, path = _resolve(uri, filesystem)
    parent = posixpath.dirname(path)
    with _s3_errors(uri):
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
    with _s3_errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str | Path, suffix: str = "", recursive: bool = False) -> list[str]:
    """Sorted URIs of the files under directory `uri` whose names end with `suffix` ([] if none)."""
    return [file_uri for file_uri, _, _ in list_file_infos(uri, recursive) if file_uri.endswith(suffix)]


def list_file_infos(uri: str | Path, recursive: bool = False) -> list[tuple[str, int, int]]:
    """Sorted (URI, size in bytes, mtime in ns) of the files under directory `uri` ([] if it is not a directory):
    what tells a changed file from an unchanged one without reading it."""
    base = normalize(uri)
    fs, path = filesystem_and_path(base)
    with _s3_errors(base):
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            return []
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    found = [(join(base, posixpath.relpath(i.path, path)), int(i.size or 0), int(i.mtime_ns or 0))
             for i in infos if i.type == pafs.FileType.File]
    return sorted(found)


def file_info(uri: str | Path) -> tuple[int, int] | None:
    """(size in bytes, mtime in ns) of a file, or None when there is no file at `uri`."""
    fs, path = filesystem_and_path(uri)
    with _s3_errors(uri):
        info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    return int(info.size or 0), int(info.mtime_ns or 0)


def delete_file(uri: str | Path) -> None:
    """Remove one file; nothing happens if it does not exist."""
    fs, path = filesystem_and_path(uri)
    with _s3_errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def delete_dir(uri: str | Path) -> None:
    """Remove a directory and everything under it; nothing happens if it does not exist."""
    fs, path = filesystem_and_path(uri)
    with _s3_errors(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def sha256_of(uri: str | Path) -> tuple[str, int]:
    """(hex SHA-256, size in bytes) of a file, streamed in 8 MiB chunks."""
    fs, path = filesystem_and_path(uri)
    digest, size = hashlib.sha256(), 0
    with _s3_errors(uri), fs.open_input_stream(path) as stream:
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


def copy_dir(source: str | Path, destination: str | Path) -> None:
    """Copy every file under `source` to `destination` (each a local path or an s3:// URI), with pyarrow.fs."""
    source_fs, source_path = filesystem_and_path(source)
    destination_fs, destination_path = filesystem_and_path(destination)
    with _s3_errors(source if is_s3(str(source)) else destination):  # errors name the S3 side
        if source_fs.get_file_info(source_path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"no directory at {normalize(source)}")
        if isinstance(destination_fs, pafs.LocalFileSystem):
            Path(destination_path).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(source_path, destination_path, source_filesystem=source_fs,
                        destination_filesystem=destination_fs)


def local_dir(uri: str | Path) -> Path:
    """A local directory holding what is at `uri`: the path itself, or a fresh temporary copy of an s3:// prefix."""
    import tempfile

    if not is_s3(str(uri)):
        return Path(uri)
    local = Path(tempfile.mkdtemp(prefix="vitpose-"))
    copy_dir(uri, local)
    return local
