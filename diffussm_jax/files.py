"""One path layer for every file a run reads or writes: local paths, `gs://` and `s3://`.

    files.write_atomically(files.join(workdir, "config.json"), text)
    with files.open(files.join(workdir, "samples", "x.npz"), "rb") as f: ...

Built on `etils.epath`, the layer orbax and tfds use (a `gs://` path goes through gcsfs, an
`s3://` path through s3fs; orbax writes checkpoint arrays to `gs://` through tensorstore). Paths
stay strings: local ones are made absolute (`~` expanded), bucket URLs pass unchanged.

Atomic writes. A reader must never see half a file, even when the writer is killed:
  * local disk: write `<path>.tmp<pid>`, fsync, then `os.replace` (an atomic rename);
  * object storage: there is no rename (a "move" is a copy plus a delete), but a single object
    upload is atomic: the object appears, complete, only when the upload is finalised, and a
    killed upload leaves nothing. So the file is written straight to its final name in one
    upload, which replaces any previous version whole.
Object storage has no append either: `append_lines` rewrites the whole object (see there).

Test against a local GCS emulator: `STORAGE_EMULATOR_HOST=http://host:port` (gcsfs and
google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL=http://host:port` (orbax's arrays);
tests/test_object_storage.py starts fake-gcs-server itself.
"""

from __future__ import annotations

import builtins
import functools
import io
import os
from typing import IO, Any

import numpy as np
from etils import epath

REMOTE_PREFIXES = ("gs://", "s3://")


def is_remote(path: str | os.PathLike) -> bool:
    """True for object-storage URLs (`gs://bucket/...`, `s3://bucket/...`)."""
    return os.fspath(path).startswith(REMOTE_PREFIXES)


def resolve(path: str | os.PathLike) -> str:
    """A local path made absolute (`~` expanded); a bucket URL without its trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/")
    return os.path.abspath(os.path.expanduser(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`os.path.join` that also joins under `gs://bucket/...`."""
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(part.strip("/") for part in parts)])
    return os.path.join(base, *parts)


def basename(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    return path.rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(path)


def _path(path: str | os.PathLike) -> epath.Path:
    if is_remote(path):
        _no_listing_cache()
    return epath.Path(os.fspath(path))


@functools.cache
def _no_listing_cache() -> None:
    """Turns off fsspec's cache of bucket listings: other processes (and tensorstore, which
    writes orbax's arrays) change the bucket behind this process's back, and a stale listing
    would hide a new checkpoint step or show a deleted one."""
    import fsspec.config

    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


def exists(path: str | os.PathLike) -> bool:
    return os.path.exists(path) if not is_remote(path) else _path(path).exists()


def isdir(path: str | os.PathLike) -> bool:
    """A directory, or on object storage a prefix that holds objects."""
    return os.path.isdir(path) if not is_remote(path) else _path(path).is_dir()


def isfile(path: str | os.PathLike) -> bool:
    return os.path.isfile(path) if not is_remote(path) else _path(path).is_file()


def size(path: str | os.PathLike) -> int:
    """Bytes in the file."""
    return os.path.getsize(path) if not is_remote(path) else _path(path).stat().length


def makedirs(path: str | os.PathLike) -> None:
    """Creates the directory and its parents (nothing to create on object storage)."""
    if not is_remote(path):
        os.makedirs(path, exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
    """Names (not paths) of the entries in a directory, sorted."""
    if not is_remote(path):
        return sorted(os.listdir(path))
    try:
        return sorted(child.name for child in _path(path).iterdir())
    except FileNotFoundError:  # a prefix without objects: an empty directory
        return []


def open(path: str | os.PathLike, mode: str = "r") -> IO[Any]:
    """A file object for reading or (non-atomic) writing; text is UTF-8."""
    encoding = None if "b" in mode else "utf-8"
    if not is_remote(path):
        return builtins.open(path, mode, encoding=encoding)
    return _path(path).open(mode, encoding=encoding)


def read_text(path: str | os.PathLike) -> str:
    with open(path, "r") as f:
        return f.read()


def read_bytes(path: str | os.PathLike) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
    """Writes `data` so that a reader sees the old file or the new one, never a torn one.

    Local disk: temporary file, fsync, atomic rename. Object storage: one upload to the final
    name (an object is visible only once its upload is complete). Parents are created.
    """
    path = os.fspath(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    if is_remote(path):
        with _path(path).open("wb") as f:
            f.write(payload)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = local_temporary(path)
    try:
        with builtins.open(temporary, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        publish(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def local_temporary(path: str | os.PathLike) -> str:
    """Where to build a large file that `publish` then puts at `path`: beside it on local disk
    (so the final rename is atomic), in the system's temporary directory for a bucket."""
    path = os.fspath(path)
    if not is_remote(path):
        return f"{path}.tmp{os.getpid()}"
    import tempfile

    handle, temporary = tempfile.mkstemp(suffix="_" + basename(path))
    os.close(handle)
    return temporary


def publish(temporary: str, path: str | os.PathLike) -> None:
    """Moves a finished local file (from `local_temporary`) to `path` atomically: a rename on
    local disk, one upload (then the local copy is removed) for a bucket."""
    if not is_remote(path):
        os.replace(temporary, path)
        return
    try:
        import fsspec

        filesystem, _ = fsspec.core.url_to_fs(os.fspath(path))
        filesystem.put_file(temporary, os.fspath(path))
    finally:
        os.remove(temporary)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    """`np.savez(path, **arrays)`, written atomically (`write_atomically`); no ".npz" appended."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomically(path, buffer.getvalue())


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of an .npz, without pickle (object arrays are refused by numpy)."""
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


def append_lines(path: str | os.PathLike, lines: list[str], cache: list[str] | None = None) -> None:
    """Appends `lines` (each without its newline) to a text file.

    Local disk: an ordinary append. Object storage cannot append, so the whole object is written
    again (atomically) from `cache`, the caller's copy of the file's lines, which this extends;
    a writer that owns the file (one process writes metrics.jsonl) keeps that copy so the file
    is never read back. Cost: the file's size per call (metrics.jsonl: about 0.3 kB per logged
    step, so 3 MB after 10,000 logged steps).
    """
    if not is_remote(path):
        with builtins.open(path, "a", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
        return
    if cache is None:
        cache = read_text(path).splitlines() if exists(path) else []
    cache.extend(lines)
    write_atomically(path, "".join(line + "\n" for line in cache))


def remove(path: str | os.PathLike) -> None:
    """Removes a file if it exists."""
    if not is_remote(path):
        if os.path.exists(path):
            os.remove(path)
    elif exists(path):
        _path(path).unlink()


def remove_tree(path: str | os.PathLike) -> None:
    """Removes a directory (all objects under a prefix) if it exists; errors are ignored."""
    if not is_remote(path):
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        if _path(path).exists():
            _path(path).rmtree()
    except FileNotFoundError:
        pass


def rename(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Moves a directory. Atomic on local disk. Object storage has no rename: every object is
    copied, then the source is deleted, so a kill in between can leave both (callers must
    tolerate that; the checkpoint code below only moves steps it no longer needs)."""
    if not is_remote(source):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        os.rename(source, target)
        return
    import fsspec

    filesystem, _ = fsspec.core.url_to_fs(os.fspath(source))
    filesystem.copy(os.fspath(source), os.fspath(target), recursive=True)
    filesystem.rm(os.fspath(source), recursive=True)
