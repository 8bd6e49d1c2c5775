"""Output folders that never destroy input (docs/reliability.md#output-folders).

Every ``calibkern`` command writes its ``--out`` through :class:`StagedOutput`:

* **refused** unless ``--overwrite``: an ``--out`` that already holds files (a model, earlier results, an
  interrupted run); **always refused**: an ``--out`` that is, or contains, one of the command's inputs (the
  model it reads, its data, its configuration) — replacing it would delete the input;
* **locked**: ``.<name>.lock`` beside ``--out`` (``fcntl.flock``, released by the kernel when its process ends,
  so a killed run leaves no stale lock); a second run on the same folder stops with the holder's pid, and a file
  system without locks (``ENOLCK``: NFS without its lock service) is refused, naming the option;
* **atomic**: results are written into ``.<name>.partial-<random>`` beside ``--out`` and renamed into place
  with the completion marker ``calibkern-complete.json`` inside, so ``--out`` is either the old folder or the
  whole new one; ``calibkern report`` refuses a folder without the marker.

:func:`check_name` checks every name that comes from an input (a stage, task, model or file name) before it
becomes part of a path.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import shutil
import sys
import tempfile

MARKER = "calibkern-complete.json"


def check_name(name, what: str) -> str:
    """``name`` if it is one plain path component — not empty, not ``.`` or ``..``, no ``/``, ``\\``, NUL or
    control character, at most 200 characters — else ``ValueError`` naming ``what`` (e.g. "stage name in
    run/results.json")."""
    if not isinstance(name, str):
        raise ValueError(f"{what}: expected a string, got {type(name).__name__} {name!r}")
    if (name in ("", ".", "..") or len(name) > 200 or any(c in name for c in "/\\")
            or any(ord(c) < 32 or ord(c) == 127 for c in name)):
        raise ValueError(f"{what}: {name!r} is not a plain file name (no '/', '\\', '..', control characters; "
                         "at most 200 characters)")
    return name


def _inside(path: str, root: str) -> bool:
    """Whether ``path`` is ``root`` or lies under it (both real, absolute paths)."""
    return os.path.commonpath([path, root]) == root


def _holds(out: str) -> str:
    """What an existing, non-empty ``out`` holds, in words."""
    names = os.listdir(out)
    if "config.json" in names:
        return "a model (config.json)"
    for name in ("results.json", "metrics.json", "summary.json", "token_metrics.json"):
        if name in names:
            kind = "earlier results" if MARKER in names else "an interrupted run (no completion marker)"
            return f"{kind} ({name})"
    return f"{len(names)} file(s) ({', '.join(sorted(names)[:3])}{', …' if len(names) > 3 else ''})"


def check_out(out: str, *, overwrite: bool, inputs=(), option: str = "--out") -> None:
    """The refusals of the module docstring, before anything is loaded or written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{option} {out}: exists and is not a directory")
    real = os.path.realpath(out)
    for path in inputs:
        if path is not None and os.path.exists(path) and _inside(os.path.realpath(path), real):
            raise ValueError(f"{option} {out}: is or contains the input {path}; writing there would replace it — "
                             f"choose another {option}")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ValueError(f"{option} {out}: already holds {_holds(out)}; pass --overwrite to replace it, or choose "
                         f"another {option}")


class FolderLock:
    """An exclusive, non-blocking ``flock`` on ``<parent>/.<name>.lock`` that records its holder's pid; the file is
    removed on release (its inode is checked after locking, so a lock on a file removed meanwhile is retried)."""

    def __init__(self, folder: str, option: str = "--out"):
        parent, name = os.path.split(os.path.abspath(folder))
        self.path = os.path.join(parent, f".{name}.lock")
        self.folder, self.option, self.fd = folder, option, None

    def __enter__(self):
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES):  # ENOLCK, EOPNOTSUPP: no locks there
                    raise ValueError(f"{self.option} {self.folder}: cannot lock {self.path} ({error.strerror}); "
                                     "calibkern locks an output folder so that two runs never write it at once (and "
                                     f"clears a killed run's partial folders only while it holds the lock): choose an "
                                     f"{self.option} on a file system with locks (a local disk, or NFS with its lock "
                                     "service)") from None
                raise ValueError(f"{self.option} {self.folder}: another calibkern run (pid {holder}) is writing it "
                                 f"(lock {self.path}); wait for it to finish, or choose another {self.option}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc):
        try:
            os.unlink(self.path)
        finally:
            os.close(self.fd)
            self.fd = None


def _remove_stale(out: str) -> None:
    """Partial folders a killed run left beside ``out`` (the lock is held, so no live run owns them); a previous
    folder that a swap left aside is put back when ``out`` is missing."""
    parent, name = os.path.split(os.path.abspath(out))
    for entry in os.listdir(parent):
        path = os.path.join(parent, entry)
        if entry.startswith(f".{name}.partial-"):
            shutil.rmtree(path, ignore_errors=True)
        elif entry.startswith(f".{name}.previous-"):
            if os.path.exists(out):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.rename(path, out)
                print(f"calibkern: restored {out} from {path}, left aside by an interrupted run", file=sys.stderr)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_marker(folder: str, command: str, extra: dict | None = None) -> None:
    """``folder/calibkern-complete.json``: the command, when it finished, its provenance (docs/demo.md#provenance;
    ``extra`` may give the run's own) and ``extra``."""
    from .provenance import provenance

    record = {"command": command, "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "provenance": provenance(), **(extra or {})}
    with open(os.path.join(folder, MARKER), "w", encoding="utf-8") as handle:
        json.dump(record, handle, indent=2)


def check_complete(folder: str) -> None:
    """``ValueError`` unless ``folder`` holds the completion marker."""
    if not os.path.isfile(os.path.join(folder, MARKER)):
        raise ValueError(f"{folder}: no {MARKER}: the run that wrote it did not finish (or an older calibkern "
                         "wrote it); run it again")


class StagedOutput:
    """``with StagedOutput(out, overwrite=…, inputs=[…]) as staged:`` — write into ``staged.path``, then
    ``staged.commit(command)``; leaving the block without a commit discards everything written."""

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, inputs=(), option: str = "--out"):
        self.out = os.fspath(out)
        self.overwrite, self.inputs, self.option = overwrite, list(inputs), option
        self.path = None
        self._lock = FolderLock(self.out, option)

    def __enter__(self):
        check_out(self.out, overwrite=self.overwrite, inputs=self.inputs, option=self.option)
        parent = os.path.dirname(os.path.abspath(self.out))
        try:
            os.makedirs(parent, exist_ok=True)
            self._lock.__enter__()
        except OSError as error:
            raise ValueError(f"{self.option} {self.out}: cannot write there ({error.strerror or error})") from None
        try:
            _remove_stale(self.out)
            check_out(self.out, overwrite=self.overwrite, inputs=self.inputs, option=self.option)  # under the lock
            self.path = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(self.out))}.partial-", dir=parent)
            os.chmod(self.path, 0o777 & ~_umask())  # mkdtemp's 0700 would become the folder's mode
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def commit(self, command: str, extra: dict | None = None) -> None:
        """Mark the staged folder complete and rename it to ``out`` (the previous ``out`` is removed after)."""
        write_marker(self.path, command, extra)
        previous = None
        if os.path.exists(self.out):
            parent, staged = os.path.split(self.path)
            previous = os.path.join(parent, staged.replace(".partial-", ".previous-", 1))
            os.rename(self.out, previous)
        os.rename(self.path, self.out)
        self.path = None
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def __exit__(self, *exc):
        try:
            if self.path is not None:
                shutil.rmtree(self.path, ignore_errors=True)
        finally:
            self._lock.__exit__(None, None, None)
