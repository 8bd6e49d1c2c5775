"""The C++ extension built at first use: compiled once per (C++ sources, torch, C++ ABI, Python, CPU target)
into a per-user cache that no one else can write, under a lock that names its holder.

A cache entry is ``<cache>/torch<version>-py<XY>-<key>/``, ``key`` a hash of :func:`build_record` — the
sources' contents, torch's version and C++ ABI, the Python extension ABI, the ``-march`` target and the CPU
flags it enables — and nothing else (no paths, no file times):

* ``_C.so`` — the extension, renamed into place whole once it has linked. When it is there it is loaded
  directly, with no build step: a reinstall, a second virtual environment or a moved checkout with the same
  torch finds it and compiles nothing.
* ``build.json`` — the record it was built for, and why it was built.
* ``build.lock`` — an ``flock`` held by the process that builds, with its pid and host written inside. The
  kernel releases it when that process dies, however it dies; the next builder finds the holder's line still
  there, says on stderr that it breaks the lock, and builds. A process that finds the lock held waits for
  ``CALIBKERN_BUILD_TIMEOUT`` seconds (default 900) at most.
* ``build-failed.log`` — the compiler's output after a compiler error (and only then: an interrupted,
  killed or out-of-space build is tried again by the next import), shown by every process that would build
  here until the entry is deleted.
* ``build-<pid>/`` — the work directory of the process that builds: the sources copied from the hashed
  contents, ninja's files; removed after a build, and a dead builder's by the next one (so that compilers a
  killed builder left running write into a deleted directory, never into the next build's).

The cache root, the entry and ``_C.so`` must belong to the user (or root) and be writable by no one else;
anything else is refused before any code is loaded from it (:func:`check_private`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from typing import NamedTuple

from calibkern import _build

LAYOUT = "2"  # the entry layout above; part of the key, so no older layout is ever read as this one
LIBRARY = "_C.so"
RECORD = "build.json"
LOCK = "build.lock"
FAILED_MARKER = "build-failed.log"
WORK_PREFIX = "build-"
MODULE_NAME = "_C"  # the ahead-of-time build's name too: the two are the same library
DEFAULT_TIMEOUT_S = 900.0
# what makes a failed build a compiler error (source location or linker), and what makes it an accident
COMPILER_ERROR = re.compile(r"^\S+:\d+(?::\d+)?: (?:fatal )?error: |undefined reference to |^collect2: error: ",
                            re.MULTILINE)
NOT_THE_SOURCES = ("interrupted by user", "Killed signal terminated program", "No space left on device",
                   "Cannot allocate memory", "virtual memory exhausted", "Disk quota exceeded")
RECORD_FIELDS = (("sources", "the C++ sources"), ("torch", "torch"), ("cxx11_abi", "torch's C++11 ABI"),
                 ("python", "the Python ABI"), ("march", "the -march target"), ("cpu_flags", "its CPU flags"))


class UntrustedCacheError(ImportError):
    """The build cache (or a build in it) belongs to someone else or can be written by others."""


class CacheEntry(NamedTuple):
    """A build's place in the cache, what it is built for, and the sources it is built from."""

    directory: str
    record: dict
    files: dict  # relative path -> contents

    @property
    def library(self) -> str:
        return os.path.join(self.directory, LIBRARY)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)


def say(message: str) -> None:
    print(f"calibkern: {message}", file=sys.stderr, flush=True)


def source_files(root: str | None = None) -> dict[str, bytes]:
    """Every ``.cpp`` and ``.h`` file under the C++ sources (``_build.CSRC``), relative path -> contents."""
    root = root or _build.CSRC
    paths = [path for pattern in ("*.cpp", "*.h") for path in glob.glob(os.path.join(root, "**", pattern),
                                                                       recursive=True)]
    files = {}
    for path in sorted(paths):
        with open(path, "rb") as handle:
            files[os.path.relpath(path, root).replace(os.sep, "/")] = handle.read()
    return files


def build_record(files: dict[str, bytes]) -> dict:
    """What a build depends on: torch version and ABI, the Python extension ABI, ``-march`` target and the CPU
    flags it enables, and a hash of the sources' contents."""
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    version, abi = _build.torch_identity()
    target = _build.march()
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or f".{sys.implementation.cache_tag}.so"
    return {"sources": digest.hexdigest()[:16], "torch": version, "cxx11_abi": abi,
            "python": suffix.strip(".").removesuffix(".so").removesuffix(".pyd"), "march": target,
            "cpu_flags": _build.target_cpu_flags(target)}


def cache_entry(files: dict[str, bytes] | None = None) -> CacheEntry:
    """The cache entry of the build this process needs."""
    files = source_files() if files is None else files
    if "bindings.cpp" not in files:
        raise ImportError(f"the C++ sources are not in {_build.CSRC} (no bindings.cpp): a broken install of calibkern")
    record = build_record(files)
    key = hashlib.sha256(json.dumps([LAYOUT, record], sort_keys=True).encode()).hexdigest()[:16]
    tag = re.sub(r"[^0-9A-Za-z.]+", "_", record["torch"])
    python = f"py{sys.version_info[0]}{sys.version_info[1]}"
    return CacheEntry(os.path.join(_build.cache_root(), f"torch{tag}-{python}-{key}"), record, files)


def check_private(path: str) -> None:
    """Refuse (UntrustedCacheError) ``path`` unless it belongs to this user or root and only its owner can
    write it — what ssh asks of ``~/.ssh``, so that no other account can plant code this process loads."""
    info = os.stat(path)
    me = os.geteuid()
    problem = None
    if info.st_uid not in (me, 0):
        problem = f"it belongs to uid {info.st_uid}, not to you (uid {me})"
    elif info.st_mode & 0o022:
        who = " and ".join(name for bit, name in ((0o020, "its group"), (0o002, "others")) if info.st_mode & bit)
        problem = f"{who} can write it (mode {info.st_mode & 0o7777:04o})"
    if problem:
        raise UntrustedCacheError(
            f"refusing the cpp build cache {path}: {problem}; calibkern loads compiled code only from a directory "
            "of yours that no one else can write (`chmod go-w` it, or set CALIBKERN_CACHE to such a directory)")


def _private_directory(path: str) -> None:
    """Create ``path`` (mode 0700) if it does not exist, then :func:`check_private` it."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as error:
        raise ImportError(f"cannot create the cpp build cache {path} ({error.strerror}); set CALIBKERN_CACHE to a "
                          "directory of yours") from None
    check_private(path)


def _holder() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def wait_timeout() -> float:
    """``CALIBKERN_BUILD_TIMEOUT``: how many seconds a process waits for another's build (default 900)."""
    text = os.environ.get("CALIBKERN_BUILD_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ImportError(f"CALIBKERN_BUILD_TIMEOUT must be a number of seconds > 0; got {text!r}")
    return value


@contextlib.contextmanager
def build_lock(path: str, timeout: float):
    """Hold the build lock ``path`` (an ``flock``, released by the kernel when its holder dies), with this
    process's pid and host written in it; wait at most ``timeout`` seconds for another holder."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise ImportError(f"cannot open the build lock {path} ({error.strerror})") from None
    try:
        start, told = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pass
            except OSError as error:
                raise ImportError(f"cannot lock {path} ({error.strerror}); set CALIBKERN_CACHE to a directory on a "
                                  "local file system") from None
            holder, waited = _read_text(path) or "another process", time.monotonic() - start
            if waited >= timeout:
                raise ImportError(f"waited {waited:.0f} s for the cpp build held by {holder} (lock file {path}); "
                                  "raise CALIBKERN_BUILD_TIMEOUT to wait longer, or stop that process")
            if not told:
                say(f"waiting for the cpp build of {holder} (lock file {path}; at most {timeout:.0f} s)")
                told = True
            time.sleep(0.2)
        left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        if left:
            say(f"breaking the build lock {path}: its holder ({left}) is gone, killed before it finished; "
                "building again")
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_holder() + "\n").encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)


def is_compiler_error(text: str) -> bool:
    """Whether a failed build's output is the compiler's (or linker's) verdict on the sources — worth
    remembering — rather than an interruption, a killed compiler or a full disk."""
    return bool(COMPILER_ERROR.search(text)) and not any(sign in text for sign in NOT_THE_SOURCES)


def first_lines(text: str, count: int = 3) -> str:
    """The first ``count`` lines that say something (``error`` lines first when there are some)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join((errors or lines)[:count]) or "no output"


def _failed_earlier(entry: CacheEntry) -> ImportError | None:
    log = entry.path(FAILED_MARKER)
    if not os.path.exists(log):
        return None
    return ImportError(f"compiling the cpp backend failed ({first_lines(_read_text(log))}); the compiler's output "
                       f"is in {log}; delete {entry.directory} to try again")


def _write_atomic(path: str, text: str) -> None:
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _load_library(path: str):
    spec = importlib.util.spec_from_file_location(MODULE_NAME, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rebuild_reason(entry: CacheEntry) -> str:
    """Why no build in the cache fits: what differs from the nearest earlier build's record."""
    root = os.path.dirname(entry.directory)
    records = []
    for path in glob.glob(os.path.join(root, "*", RECORD)):
        try:
            with open(path, encoding="utf-8") as handle:
                records.append(json.load(handle))
        except (OSError, ValueError):
            continue
    if not records:
        return f"no earlier build in {root}"
    nearest = min(records, key=lambda old: sum(old.get(field) != entry.record[field] for field, _ in RECORD_FIELDS))
    changes = []
    for field, label in RECORD_FIELDS:
        old, new = nearest.get(field), entry.record[field]
        if old != new:
            changes.append(f"{label} changed" if field in ("sources", "cpu_flags") else f"{label} {old} -> {new}")
    return "; ".join(changes) + " since the nearest earlier build" if changes else "the earlier build was removed"


def _compile(entry: CacheEntry, why: str):
    """Compile the entry's sources in its work directory, then :func:`install` the library."""
    from torch.utils import cpp_extension

    for leftover in glob.glob(entry.path(WORK_PREFIX + "*")):  # killed builds' work, torch's lock files among it
        shutil.rmtree(leftover, ignore_errors=True)
    work = entry.path(f"{WORK_PREFIX}{os.getpid()}")
    csrc = os.path.join(work, "csrc")
    for name, data in entry.files.items():
        os.makedirs(os.path.dirname(os.path.join(csrc, name)), exist_ok=True)
        with open(os.path.join(csrc, name), "wb") as handle:
            handle.write(data)
    say(f"compiling the cpp backend into {entry.directory} ({why}); once, about a minute")
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([*_ninja_dirs(), path])  # torch runs `ninja` from PATH
    try:
        module = cpp_extension.load(name=MODULE_NAME, sources=_build.sources(csrc),
                                    extra_cflags=_build.cxx_flags(entry.record["march"]),
                                    extra_ldflags=_build.LINK_FLAGS, extra_include_paths=[csrc],
                                    build_directory=work, verbose=False)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as error:
        text = str(error) + "\n" + str(getattr(error, "output", "") or "")
        if "interrupted by user" in text:  # ninja saw the Ctrl-C first
            raise KeyboardInterrupt from None
        if not is_compiler_error(text):
            raise ImportError(f"building the cpp backend stopped ({first_lines(text)}); the next import tries "
                              "again") from None
        _write_atomic(entry.path(FAILED_MARKER), text)
        raise _failed_earlier(entry) from None
    finally:
        os.environ["PATH"] = path
    install(entry, module.__file__, why)
    shutil.rmtree(work, ignore_errors=True)
    return module


def install(entry: CacheEntry, library: str, why: str) -> None:
    """Copy a built ``library`` into the entry whole (a temporary file renamed into place), then its record."""
    temporary = f"{entry.library}.{os.getpid()}.tmp"
    shutil.copyfile(library, temporary)
    os.chmod(temporary, 0o755)
    os.replace(temporary, entry.library)
    _write_atomic(entry.path(RECORD), json.dumps({**entry.record, "reason": why, "built_at": time.time()}, indent=1))


def cached_library(entry: CacheEntry) -> str | None:
    """The entry's library when the cache holds it (checked as :func:`jit_load` checks it), else None."""
    if not os.path.exists(entry.library):
        return None
    for path in (_build.cache_root(), entry.directory, entry.library):
        check_private(path)
    return entry.library


def store(entry: CacheEntry, library: str, why: str) -> None:
    """Put a library built elsewhere (setup.py's ahead-of-time build) into the cache, unless it is there."""
    _private_directory(_build.cache_root())
    _private_directory(entry.directory)
    with build_lock(entry.path(LOCK), wait_timeout()):
        if not os.path.exists(entry.library):
            install(entry, library, why)


def jit_load(why: str, entry: CacheEntry | None = None):
    """(the extension, whether this process compiled it): the cache entry's library when it is there — loaded
    as is, nothing written — else compiled under the entry's lock, or the compiler error of an earlier try.
    ``why`` (the ahead-of-time build's problem) goes into the stderr line a build prints, with what changed
    since the nearest earlier build. ImportError for every way this can fail (OSError where the file system
    fails it); KeyboardInterrupt passes."""
    entry = cache_entry() if entry is None else entry
    _private_directory(_build.cache_root())
    if cached_library(entry):
        return _load_library(entry.library), False
    _private_directory(entry.directory)
    failed = _failed_earlier(entry)
    if failed is not None:
        raise failed
    with build_lock(entry.path(LOCK), wait_timeout()):
        if cached_library(entry):  # built by the holder we waited for
            return _load_library(entry.library), False
        failed = _failed_earlier(entry)
        if failed is not None:
            raise failed
        return _compile(entry, f"{why}; {rebuild_reason(entry)}"), True


def _ninja_dirs() -> list[str]:
    """Where the ``ninja`` of this environment lives (the PyPI package's, the interpreter's bin directory),
    which an environment used without activation does not have on PATH."""
    dirs = [os.path.dirname(sys.executable)]
    if importlib.util.find_spec("ninja") is not None:
        import ninja

        dirs.insert(0, getattr(ninja, "BIN_DIR", dirs[0]))
    return dirs
