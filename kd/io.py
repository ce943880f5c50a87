"""Crash-safe file output: every file is written to a temp file in the same directory,
flushed, fsynced, then renamed over the target, so a kill leaves the old file or the new one. Files get
the permissions the umask gives (as open() would), not mkstemp's 0600.

Checkpoints (atomic_torch_save) end with a trailer holding the SHA-256 of the bytes before it, so a file
changed on disk (bit rot, a bad copy) is detected on load; torch.load ignores the trailer, so the files
stay ordinary torch checkpoints."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, IO

import torch

from .errors import CheckpointError, WriteError, first_line


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(path.parent, f".{path.name}.")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    except OSError as e:  # a read-only or unreachable folder
        raise WriteError(f"cannot write {path}: {os.strerror(e.errno) if e.errno else first_line(e)}") from None
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600: readable by the owner alone
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write (a full disk) as a RuntimeError
        if os.path.exists(tmp):
            os.unlink(tmp)
        reason = os.strerror(e.errno) if isinstance(e, OSError) and e.errno else first_line(e)
        if isinstance(e, RuntimeError):
            reason = f"the write failed; is the disk full? ({reason})"
        raise WriteError(f"cannot write {path}: {reason}") from None
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # fsync the directory so the rename itself survives a power loss
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_orphans(folder: Path, prefix: str) -> None:
    """Delete the temp files and folders `<prefix><pid>.*` in `folder` whose writing process has ended (killed
    mid-write: a later write of the same target cleans up after it). Those of live processes are left alone."""
    for entry in folder.glob(f"{glob_escape(prefix)}*"):
        pid = entry.name[len(prefix) :].split(".", 1)[0].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def current_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it: restore at once
    os.umask(mask)
    return mask


CHECKSUM_TAG = b"\nkd-sha256:"  # trailer: tag + 32-byte digest of every byte before the tag
TRAILER_LEN = len(CHECKSUM_TAG) + 32


class _HashingWriter:
    """A write-only file wrapper that hashes what passes through (torch.save writes sequentially)."""

    def __init__(self, f: IO[bytes]):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save `obj` to `path` atomically, followed by the checksum trailer (verified by safe_torch_load)."""

    def write(f: IO[bytes]) -> None:
        hashing = _HashingWriter(f)
        torch.save(obj, hashing)
        f.write(CHECKSUM_TAG + hashing.sha.digest())

    _atomic_write(path, write)


def verify_checksum(path: Path) -> bool | None:
    """True when the file's checksum trailer matches its content, False when it does not, None when the
    file has no trailer (written by torch.save elsewhere, or by an older kd)."""
    size = path.stat().st_size
    if size < TRAILER_LEN:
        return None
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(size - TRAILER_LEN)
        trailer = f.read(TRAILER_LEN)
        if not trailer.startswith(CHECKSUM_TAG):
            return None
        f.seek(0)
        left = size - TRAILER_LEN
        while left:
            chunk = f.read(min(left, 1 << 24))
            if not chunk:
                return False
            sha.update(chunk)
            left -= len(chunk)
    return sha.digest() == trailer[len(CHECKSUM_TAG) :]


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    _atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write `data` to `path` atomically (a figure rendered in memory, say)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` as indented, strict JSON to `path` atomically: NaN and infinities become null (bare NaN is
    not JSON; other readers refuse the file)."""
    atomic_write_text(
        json.dumps(finite_or_none(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n", path
    )


def finite_or_none(obj: Any) -> Any:
    """`obj` with every non-finite float (in nested dicts, lists and tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def atomic_link(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make `dst` name the same file as `src` (a hard link; a copy where links are unsupported), replacing
    `dst` by a rename: a reader always finds the old complete file or the new one."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link.tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:  # no hard links here (some network or FAT file systems): copy, fsynced
        _atomic_write(dst, lambda f: f.write(src.read_bytes()))
        return
    os.replace(tmp, dst)
    dir_fd = os.open(dst.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


LOAD_CAP_ENV = "KD_MAX_LOAD_GB"  # the most a loaded file may expand to in memory, in GiB
DEFAULT_LOAD_CAP_GB = 8.0  # well above any checkpoint here (a ViT-L state dict with its optimiser: ~3.5 GiB)


def load_cap_bytes() -> int:
    """The load cap in bytes: $KD_MAX_LOAD_GB GiB, else DEFAULT_LOAD_CAP_GB."""
    raw = os.environ.get(LOAD_CAP_ENV, "").strip()
    try:
        gb = float(raw) if raw else DEFAULT_LOAD_CAP_GB
    except ValueError:
        gb = float("nan")
    if not gb > 0 or math.isinf(gb):
        raise CheckpointError(f"${LOAD_CAP_ENV} must be a positive number of GiB, got {raw!r}")
    return int(gb * 2**30)


def check_load_size(path: Path, what: str = "checkpoint") -> None:
    """Refuse (CheckpointError, one line) a file whose content would take more memory than the load cap, before
    anything is read into memory: for torch's zip format the sizes its zip directory declares for its members
    (a compressed member can expand 1000-fold), else the file's size."""
    cap, size = load_cap_bytes(), path.stat().st_size
    total = size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                total = max(size, sum(i.file_size for i in zf.infolist()))
    except (OSError, zipfile.BadZipFile, ValueError):  # not a readable zip: the loader reports what it is
        pass
    if total > cap:
        raise CheckpointError(
            f"{what} {path} would expand to {total / 2**30:.3g} GiB in memory, above the load cap "
            f"of {cap / 2**30:.3g} GiB (${LOAD_CAP_ENV}: raise it for a file you trust); not loaded"
        )


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, size_cap: bool = True) -> Any:
    """torch.load with weights_only=True; a missing or unreadable file, or one whose checksum trailer does not
    match its content, raises CheckpointError (one line). Files without a trailer (torch.save elsewhere, older
    kd versions) load unverified. `size_cap`: refuse a file that would expand past the load cap
    (check_load_size, $KD_MAX_LOAD_GB) without loading it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if size_cap:
            check_load_size(path)
        verified = verify_checksum(path)
    except OSError as e:
        raise CheckpointError(f"checkpoint {path} cannot be read ({e.strerror or e})") from None
    if verified is False:
        raise CheckpointError(
            f"checkpoint {path} is corrupt: its content does not match its sha256 checksum "
            "(changed on disk after it was written)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types; all mean "not a valid checkpoint"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a kd checkpoint ({first[:160]})") from None
