"""The run directory: what marks it as a kd run, who holds it, and how --run.overwrite replaces it.

Every run directory holds `.kd-run`, written when the run creates (or first resumes) it. It is the marker
--run.overwrite asks for: only a directory holding it is ever emptied, and never the working directory or
one of its parents, so a mistyped --run.name (`.`, `..`, an absolute path) cannot delete anything else.
It is also the lock: the run (rank 0) holds an exclusive flock on it for its whole lifetime, so a second
run on the same directory refuses at once instead of mixing its files in. The lock is taken during the
checks when the directory already exists (nothing is written to take it) and again, after every check,
when prepare_run_dir() creates the directory; the kernel drops it when the process ends, however it ends.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path, PurePath

from kd.errors import ConfigError

MARKER = ".kd-run"
_held: dict[str, int] = {}  # resolved run directory -> open descriptor of its locked marker (this process)


def check_run_name(name: str) -> None:
    """--run.name is a (relative) name under --run.out-dir: no absolute path, no `.` or `..` parts."""
    parts = PurePath(name).parts
    if name and (PurePath(name).is_absolute() or any(p in (".", "..") for p in name.split("/")) or not parts):
        raise ConfigError(
            f"--run.name {name!r} must be a relative name under --run.out-dir (no absolute path, no '.' or '..' parts)"
        )


def new_run_dir(out_dir: str | Path, name: str, *, overwrite: bool) -> Path:
    """<out_dir>/<name> for a fresh run: refused (one line) when it exists with content, unless `overwrite`."""
    run_dir = Path(out_dir) / name
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"run directory {run_dir} exists; pass --run.resume auto to continue it, "
            "--run.overwrite True to replace it, or another --run.name"
        )
    return run_dir


def check_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Before any write: refuse a directory that another run holds (taking its lock when it is a kd run
    directory, which writes nothing) and, with `overwrite`, anything but a kd run directory."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if run_dir.is_symlink() or not run_dir.is_dir():
        raise ConfigError(
            f"{run_dir} exists and is not a run directory (a file or a symbolic link); choose another --run.name"
        )
    if (run_dir / MARKER).is_file():
        claim_run_dir(run_dir, create=False)
    if overwrite:
        check_deletable(run_dir)


def check_deletable(run_dir: Path) -> None:
    """Raise unless --run.overwrite may empty `run_dir`: a kd run directory (it holds the marker) that is
    neither the working directory nor one of its parents."""
    resolved, cwd = run_dir.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ConfigError(
            f"--run.overwrite refuses to delete {run_dir}: it is the working directory or one of its parents"
        )
    if not (run_dir / MARKER).is_file():
        raise ConfigError(
            f"--run.overwrite refuses to delete {run_dir}: it is not a kd run directory (no "
            f"{MARKER} marker); remove it yourself or choose another --run.name"
        )


def lock_or_holder(path: Path, create: bool = True) -> tuple[int | None, str]:
    """Take an exclusive flock on `path` (created when `create`), held until this process ends or closes the
    descriptor: (descriptor, "") when taken, (None, what the holder wrote into the file, "?" when nothing)
    when another process holds it. Raises OSError when the file cannot be opened."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return None, holder
    return fd, ""


def claim_run_dir(run_dir: Path, *, create: bool = True) -> None:
    """Take the run directory's lock (creating the directory and its marker when `create`), or raise
    ConfigError naming the process that holds it. Idempotent within a process."""
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    key = str(run_dir.resolve())
    if key in _held:
        return
    try:
        fd, holder = lock_or_holder(run_dir / MARKER, create)
    except OSError as e:
        raise ConfigError(f"cannot open {run_dir / MARKER}: {e.strerror}") from None
    if fd is None:
        raise ConfigError(
            f"run directory {run_dir} is in use by another run (pid {holder}); wait for it to end "
            "or choose another --run.name"
        )
    _held[key] = fd


def prepare_run_dir(run_dir: Path, *, overwrite: bool, fresh: bool) -> None:
    """Rank 0, after every check: create and lock the run directory, empty it when `overwrite` (the marker
    stays, and with it the lock), remove temp files a killed run left, and record this process in the
    marker. `fresh` (a new run, neither resumed nor overwriting): refuse a directory another run filled
    between the checks and now."""
    claim_run_dir(run_dir)
    if overwrite:
        check_deletable(run_dir)
        for entry in run_dir.iterdir():
            if entry.name == MARKER:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    elif fresh and any(entry.name != MARKER for entry in run_dir.iterdir()):
        release_run_dirs()
        raise ConfigError(
            f"run directory {run_dir} exists; pass --run.resume auto to continue it, "
            "--run.overwrite True to replace it, or another --run.name"
        )
    for stale in run_dir.glob(".*.tmp"):  # a kill mid-write leaves its temp file (checkpoints/: Checkpointer)
        stale.unlink(missing_ok=True)
    fd = _held[str(run_dir.resolve())]
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def release_run_dirs() -> None:
    """Drop every run-directory lock this process holds (at the end of a run; the kernel does it on exit)."""
    while _held:
        os.close(_held.popitem()[1])
