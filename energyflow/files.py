"""Reading and writing files without losing or half-writing anything.

* Every write is atomic: a unique temporary file in the destination's folder, flushed and fsynced,
  then ``os.replace``-d over the destination.  A crash, Ctrl-C or a full disk leaves either the old
  file or the new one, never a truncated one, and no temporary file behind.  The result gets the
  usual mode of a new file (``0o666`` minus the umask), not ``mkstemp``'s private ``0o600``.
* Every ``torch.load`` is ``weights_only=True``: tensors, numbers, strings and containers only.
  A file that needs more (a pickled class or function, which could run code) is refused with
  :class:`~energyflow.errors.UnsafeFileError`; nothing in it is executed.
* A missing, empty, truncated or malformed file raises an :class:`~energyflow.errors.InputError`
  that names it, so the CLI reports one line.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from typing import IO, Any, Iterator

from .errors import CorruptFileError, InputError, UnsafeFileError

__all__ = ["atomic_open", "atomic_torch_save", "write_json", "write_text", "save_figure", "copy_file", "load_torch", "read_json",
           "read_jsonl", "append_jsonl", "check_writable"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    On any exception (including ``KeyboardInterrupt`` and ``OSError(ENOSPC)``) the temporary file
    is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` atomically (see :func:`atomic_open`)."""
    import torch

    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def write_json(obj: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    kwargs = {"indent": 2, "sort_keys": True, **kwargs}
    with atomic_open(path, "w") as f:
        json.dump(obj, f, **kwargs)


def write_text(text: str, path: str | os.PathLike) -> None:
    """Write a text file atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)


def save_figure(fig: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``fig.savefig`` atomically (the format from ``path``'s extension, default png)."""
    fmt = os.path.splitext(os.fspath(path))[1].lstrip(".") or "png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format=fmt, **kwargs)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy ``src`` to ``dst`` atomically (a crash leaves the old ``dst`` or the new one)."""
    import shutil

    with open(src, "rb") as f, atomic_open(dst, "wb") as out:
        shutil.copyfileobj(f, out)


def append_jsonl(path: str | os.PathLike, record: Any) -> None:
    """Append one JSON line, rewriting the file atomically (small logs such as ``rounds.jsonl``):
    a crash leaves the file with or without the new line, never with half of it."""
    path = os.fspath(path)
    old = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
        if old and not old.endswith("\n"):
            old += "\n"
    write_text(old + json.dumps(record) + "\n", path)


def load_torch(path: str | os.PathLike, what: str = "file", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors naming ``path``.

    Raises:
        InputError: ``path`` is missing.
        CorruptFileError: empty, truncated or not a torch file.
        UnsafeFileError: it holds objects that only a full unpickler could build (refused).
    """
    import torch

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise CorruptFileError(f"{what} {path} is empty (an interrupted copy?)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        if "Unsupported global" in text or "GLOBAL " in text:  # a class or function to import and call
            first = next((line.strip() for line in text.splitlines() if "Unsupported global" in line), "")
            raise UnsafeFileError(f"refusing to load {what} {path}: it holds Python objects beyond tensors and "
                                  f"plain containers, which could run code when loaded ({first[:160]})") from None
        reason = next((line.strip() for line in text.splitlines() if "Unsupported" in line), text.splitlines()[0])
        raise CorruptFileError(f"{what} {path} is truncated or not a torch file ({reason[:200]})") from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, KeyError, OSError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0].split(". ")[0][:200]
        if not zipfile.is_zipfile(path) and (reason.strip("'").isdigit() or isinstance(err, (KeyError, ValueError))):
            reason = "not a torch file: neither a zip archive nor a legacy torch pickle"
        raise CorruptFileError(f"{what} {path} is truncated or corrupt ({reason})") from None


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Read a JSON file; a missing or malformed file raises an :class:`InputError` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{what} {path} is not valid JSON ({err})") from None


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list[Any]:
    """Read a JSON-lines file; a malformed line raises a :class:`CorruptFileError` naming file and line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{what} not found: {path}")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows.append(json.loads(line))
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{what} {path} line {number} is not valid JSON ({err.msg})") from None
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{what} {path} is not UTF-8 text ({err.reason})") from None
    return rows


def check_writable(folder: str | os.PathLike, what: str = "folder") -> None:
    """Fail fast (before any work) if ``folder`` cannot receive new files."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise InputError(f"cannot write to {what} {folder}: {err.strerror or err}") from None
