"""The errors a user can cause, as opposed to bugs: bad files, keys, URIs, devices, servers.

The CLI prints any `UserError` as one line and exits 2; everything else keeps its traceback. This
module imports nothing from the project, so `vitpose_core` and `pipelines` can both raise these
without `vitpose_core` depending on `pipelines`. The messages name the file, key or URI at fault,
because the one line is all the user sees.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Input the user can fix (a file, a key, a URI, a device, a server); printed as one line, exit 2."""


class InvalidInputError(UserError, ValueError):
    """A file or value is malformed or out of range. A ValueError too, so older `except ValueError` still apply."""


class StorageError(UserError, RuntimeError):
    """Storage (S3) failed for a reason other than a missing file: unreachable endpoint, throttling left after
    retries, bad credentials, missing bucket. Deliberately not an OSError: code that turns OSError into
    "unreadable file" skips must not record an outage as bad data."""


class ServiceError(UserError, RuntimeError):
    """A server the command needs (the MLflow tracking server, a pose service) cannot be reached, or keeps
    failing, after the client's retries. Named with its URI; like StorageError, never a skipped record."""


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def read_json_file(path: str | Path, what: str) -> Any:
    """Strict JSON from a local file: missing files, directories, non-UTF-8 bytes, malformed JSON and the
    non-standard NaN/Infinity tokens Python's json accepts are all `InvalidInputError`s naming `path`."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInputError(f"{what} file {path} is a directory, expected a JSON file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as error:
        raise InvalidInputError(f"{what} file {path} is not UTF-8 text (byte {error.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"{what} file {path} is not valid JSON: {error}") from None
    except ValueError as error:  # our NaN/Infinity rejection
        raise InvalidInputError(f"{what} file {path} is not strict JSON: {error}") from None
    except RecursionError:
        raise InvalidInputError(f"{what} file {path} nests too deeply to parse") from None


def find_user_error(error: BaseException) -> UserError | None:
    """The `UserError` behind `error`, following causes and Ray's task-error wrappers (`.cause`)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # Ray's RayTaskError keeps the task's exception here
        if isinstance(current, UserError) and not isinstance(cause, BaseException):
            return current  # a Ray wrapper that is also a UserError (as_instanceof_cause) has the clean one inside
        # not __context__: a bug raised while handling a user error is still a bug
        pending.extend([current.__cause__, cause])
    return None
