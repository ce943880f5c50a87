"""Child processes that never outlive their parent (sweep.py's trials).

The child runs in its own process group, so one signal reaches it and everything it started (data-loader
workers). A parent that is interrupted forwards the signal (`stop`); a parent that dies without cleaning up
(SIGKILL, a crash) is covered twice: on Linux the child gets SIGTERM from the kernel when its parent dies
(prctl PR_SET_PDEATHSIG), and everywhere a small watchdog process holding one end of a pipe kills the
child's group when the parent's end closes without the word that the child ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from typing import IO

STOP_GRACE_S = 60.0  # a stopped child gets this long to exit cleanly (wandb finishes the run) before SIGKILL
ORPHAN_GRACE_S = 10.0  # the same for the child of a dead parent

# Run by `python -c`: the first stdin line is the child's process group; the rest is read until the parent's
# end closes. b"done" means the child already ended; anything else (EOF from a dead parent) kills the group.
WATCHDOG = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
line = sys.stdin.buffer.readline()
rest = sys.stdin.buffer.read()
if line.strip() and rest != b"done":
    pgid, grace = int(line), float(sys.argv[1])
    try:
        os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(0.1)
            os.killpg(pgid, 0)
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""


class Interrupted(BaseException):
    """SIGTERM or SIGHUP reached this process (SIGINT stays KeyboardInterrupt); forwarded to the child."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def raise_on_termination() -> None:
    """Turn SIGTERM and SIGHUP into `Interrupted` in the main thread, so `finally` blocks forward them."""

    def handler(signum, frame):
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


def signal_of(exc: BaseException | None) -> int:
    """The signal to forward for an exception that ends the parent's wait (SIGINT for anything but SIGTERM/HUP)."""
    return exc.signum if isinstance(exc, Interrupted) else signal.SIGINT


class Child:
    """`argv` in its own process group, its output to `log`, tied to this process's lifetime."""

    def __init__(self, argv: list[str], log: IO, env: dict[str, str]):
        self._watchdog_in = self._start_watchdog()
        self._signalled = False
        self.proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, process_group=0, preexec_fn=_die_with_parent_fn()
        )
        self._tell_watchdog(f"{self.proc.pid}\n".encode())

    @staticmethod
    def _start_watchdog() -> IO[bytes] | None:
        try:
            watchdog = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", WATCHDOG, str(ORPHAN_GRACE_S)],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except OSError:  # no watchdog: PR_SET_PDEATHSIG still covers Linux
            return None
        return watchdog.stdin

    def _tell_watchdog(self, data: bytes, close: bool = False) -> None:
        if self._watchdog_in is None:
            return
        try:
            self._watchdog_in.write(data)
            self._watchdog_in.flush()
            if close:
                self._watchdog_in.close()
        except (BrokenPipeError, ValueError):
            pass

    def poll(self) -> int | None:
        return self.proc.poll()

    def send(self, sig: int) -> None:
        """`sig` to the child's group if it still runs, once: a later send or stop() sends nothing more
        (a second SIGINT would cut the child's clean exit short), so several children can be signalled
        together and then waited for."""
        if self.proc.poll() is None and not self._signalled:
            self._signalled = True
            _signal_group(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGINT, grace_s: float = STOP_GRACE_S) -> int:
        """End the child if it still runs (`sig` to its group, SIGKILL after `grace_s`); its exit code."""
        if self.proc.poll() is None:
            self.send(sig)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(self.proc.pid, signal.SIGKILL)  # a stuck leader, or workers it left behind
            self.proc.wait()
        self._tell_watchdog(b"done", close=True)
        return self.proc.returncode


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent_fn():
    """A preexec_fn asking Linux to SIGTERM the child when this process dies, or None where that is not
    possible or not safe (preexec_fn may deadlock in a process with other threads, e.g. wandb's agent;
    the watchdog covers those)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def die_with_parent() -> None:
        prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return die_with_parent
