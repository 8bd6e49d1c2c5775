"""The fast backend for a plain ``pip install``: the extension matches the running torch (built ahead of time
or at first use), no build downloads a second torch, the sources compile against the newest torch's headers,
and every unavailable backend says why (``calibkern.backend_report()``, ``calibkern info``).

The build at first use cannot wedge, fool or silently slow a user: a build killed (SIGKILL) or interrupted
(Ctrl-C) never blocks or poisons the next import, only a compiler error is remembered, and it is shown to
every process that waits; a build is loaded from the cache as is (a second copy of the package, a read-only
cache), compiles only when what it is keyed by changes, and is refused in a cache others can write."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import pytest
import torch

import calibkern
from calibkern import _build, _jit, backends

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ("avx2", "fma")


def script(*parts: str) -> str:
    return "\n".join(textwrap.dedent(part) for part in parts)


def run_python(code: str, env=None, python=sys.executable, timeout=600, cwd=None):
    """``python -c code``; ``cwd`` keeps the repository's own calibkern off sys.path for another venv."""
    environment = {k: v for k, v in os.environ.items() if k not in ("CALIBKERN_BACKEND", "PYTHONPATH")}
    environment.update(env or {})
    return subprocess.run([python, "-c", code], env=environment, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


# a build record claiming another torch, installed before calibkern is imported
FAKE_RECORD = """
    import sys, types
    record = types.ModuleType("calibkern._build_config")
    record.TORCH_VERSION = "2.4.0"
    sys.modules["calibkern._build_config"] = record
"""


def test_mismatch_names_torch_abi_and_cpu():
    version, abi = _build.torch_identity()
    same = {"TORCH_VERSION": version, "CXX11_ABI": abi, "CPP_CPU_FLAGS": FLAGS}
    assert _build.mismatch(same, version, abi, frozenset(FLAGS)) is None
    assert _build.mismatch({**same, "TORCH_VERSION": "2.4.0"}, version, abi, None) == \
        f"built for torch 2.4.0, but torch {version} is running"
    assert "_GLIBCXX_USE_CXX11_ABI" in _build.mismatch({**same, "CXX11_ABI": not abi}, version, abi, None)
    assert "lacks (fma)" in _build.mismatch(same, version, abi, frozenset({"avx2"}))
    assert _build.mismatch({}, version, abi, frozenset()) is None  # a record from before these fields


def test_first_lines_prefers_the_error_lines():
    log = "ninja: build stopped\n[1/6] c++ ...\nfoo.cpp:3:1: error: expected ';'\n\nmore\n"
    assert _jit.first_lines(log) == "foo.cpp:3:1: error: expected ';'"
    assert _jit.first_lines("") == "no output"


def test_only_a_compiler_error_is_remembered():
    assert _jit.is_compiler_error("[1/6] c++ ...\n/x/csrc/cpu/em.cpp:3:1: error: expected ';' before '}'")
    assert _jit.is_compiler_error("em.o: in function `f':\nem.cpp:(.text+0x1): undefined reference to `g'")
    assert not _jit.is_compiler_error("ninja: build stopped: interrupted by user.")
    assert not _jit.is_compiler_error("c++: fatal error: Killed signal terminated program cc1plus")
    assert not _jit.is_compiler_error("/x/em.cpp:1:1: fatal error: can't write: No space left on device")
    assert not _jit.is_compiler_error("Ninja is required to load C++ extensions")


def test_switches_take_0_or_1(monkeypatch):
    for value, meaning in (("", None), ("0", False), ("1", True)):
        monkeypatch.setenv("CALIBKERN_JIT", value)
        assert _build.env_switch("CALIBKERN_JIT") is meaning
    monkeypatch.setenv("CALIBKERN_JIT", "no")
    with pytest.raises(ValueError, match="CALIBKERN_JIT must be 0 or 1; got 'no'"):
        _build.env_switch("CALIBKERN_JIT")
    monkeypatch.setenv("CALIBKERN_PORTABLE", "yes")
    with pytest.raises(ValueError, match="CALIBKERN_PORTABLE must be 0 or 1"):
        _build.march()
    if backends.is_available("cpp"):  # the backend's reason: checked before any build is looked at
        with pytest.raises(ImportError, match="^CALIBKERN_JIT must be 0 or 1; got 'no'$"):
            backends.get_module("cpp")._load_extension()


def test_report_lists_every_backend():
    report = calibkern.backend_report()
    assert [status.name for status in report] == list(backends.BACKENDS)
    assert {status.name for status in report if status.available} == set(calibkern.available_backends())
    assert all(status.detail for status in report)
    text = backends.format_backend_report(report)
    assert text.splitlines()[0].startswith("torch   yes")


def test_info_subcommand_prints_the_report(capsys):
    from calibkern.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    for name in backends.BACKENDS:
        assert any(line.startswith(name) for line in out.splitlines())


@pytest.mark.skipif(not backends.is_available("cpp"), reason="no ahead-of-time build to disagree with")
def test_build_for_another_torch_is_refused_with_the_reason():
    """With the build at first use off, an extension built for another torch is not loaded: the report and
    an explicit choice say why, and auto warns once that CPU tensors run on the reference."""
    out = run_python(script(FAKE_RECORD, """
        import warnings, torch, calibkern
        status = {s.name: s for s in calibkern.backend_report()}["cpp"]
        print(status.available, status.detail)
        try:
            calibkern.set_backend("cpp")
        except calibkern.BackendUnavailableError as error:
            print("raised:", error)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                calibkern.ece(torch.randn(8, 4), torch.randint(0, 4, (8,)))
        print(sum("cpp backend is unavailable" in str(w.message) for w in caught))
    """), env={"CALIBKERN_JIT": "0"})
    assert out.returncode == 0, out.stderr
    status, raised, warned = out.stdout.strip().splitlines()
    assert status.startswith("False calibkern._C was built for torch 2.4.0, but torch")
    assert "CALIBKERN_JIT=0" in status
    assert raised.startswith("raised: backend 'cpp' is not available (calibkern._C was built for torch 2.4.0")
    assert warned == "1"


def test_missing_extension_is_named():
    out = run_python(script("""
        import importlib.util
        find_spec = importlib.util.find_spec
        importlib.util.find_spec = lambda name, *a: None if name == "calibkern._C" else find_spec(name, *a)
        import calibkern
        print({s.name: s for s in calibkern.backend_report()}["cpp"].detail)
    """), env={"CALIBKERN_JIT": "0"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("calibkern._C was not built ahead of time, and CALIBKERN_JIT=0")


def _private(path):
    """``path`` created as the cache a user's own calibkern creates: mode 0700."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


@pytest.fixture
def cached_build(tmp_path, monkeypatch):
    """A copy of the package (its sources fixed while the checkout may change) and a private cache
    (``CALIBKERN_CACHE``) holding the entry of its sources, this torch and target, filled with a copy of the
    ahead-of-time build — the same recipe as a build at first use, and the same module: (the cache root, the
    entry, the package copy)."""
    built = glob.glob(os.path.join(REPO, "calibkern", "_C*.so"))
    if not built:
        pytest.skip("no ahead-of-time build to fill the cache with")
    copy = _package_copy(tmp_path / "copy")
    monkeypatch.setattr(_build, "CSRC", str(copy / "csrc"))
    root = _private(tmp_path / "cache")
    monkeypatch.setenv("CALIBKERN_CACHE", str(root))
    entry = _jit.cache_entry()
    _private(entry.directory)
    shutil.copy(built[0], entry.library)
    os.chmod(entry.library, 0o755)
    return root, entry, copy


def test_a_second_copy_of_the_package_loads_the_cached_build_as_is(cached_build, tmp_path):
    """Another install of the same sources with the same torch — new paths, new file times, as a reinstall or
    a second venv sharing the cache gives — loads the cached build and compiles nothing; it writes nothing
    into the cache either, so a read-only cache serves as well (every mode bit cleared to read-only). The
    build record of the other torch keeps this venv's editable ahead-of-time build out."""
    root, entry, copy = cached_build
    for path in [root, *root.rglob("*")]:
        os.chmod(path, 0o555 if path.is_dir() else 0o444)
    before = _tree(root)
    try:
        out = run_python(script(FAKE_RECORD, LOAD_AND_COMPARE), cwd=copy)
    finally:
        for path in [root, *root.rglob("*")]:
            os.chmod(path, 0o700)
    assert out.returncode == 0, out.stderr
    file, how, same = out.stdout.strip().splitlines()
    assert file.startswith(str(copy)) and same == "True"
    assert how.startswith(f"built at first use in {entry.directory}, loaded from the cache (calibkern._C was built "
                          "for torch 2.4.0"), how
    assert "compiling" not in out.stderr and _tree(root) == before, out.stderr


def test_setup_takes_the_ahead_of_time_build_from_the_cache(cached_build, tmp_path):
    """setup.py (a reinstall of the same sources with the same torch) copies calibkern._C from the build cache,
    says so, and compiles nothing."""
    root, entry, copy = cached_build
    out = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "CALIBKERN_CACHE": str(root)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"calibkern._C taken from the build cache {entry.directory}" in out.stderr
    built = glob.glob(str(copy / "calibkern" / "_C*.so"))
    assert len(built) == 1 and open(built[0], "rb").read() == open(entry.library, "rb").read()
    assert not list(copy.rglob("*.o")) and "compiling" not in out.stderr


def test_a_build_from_elsewhere_is_stored_once(tmp_path, monkeypatch):
    """What setup.py compiles goes into the cache (with its record) for later installs and first uses."""
    monkeypatch.setenv("CALIBKERN_CACHE", str(tmp_path / "cache"))
    entry = _jit.cache_entry()
    library = tmp_path / "built.so"
    library.write_bytes(b"a library")
    assert _jit.cached_library(entry) is None
    _jit.store(entry, str(library), "built ahead of time by setup.py")
    library.write_bytes(b"another")
    _jit.store(entry, str(library), "built ahead of time by setup.py")
    assert open(_jit.cached_library(entry), "rb").read() == b"a library"
    assert os.stat(tmp_path / "cache").st_mode & 0o777 == 0o700
    with open(entry.path(_jit.RECORD)) as handle:
        assert json.load(handle)["reason"] == "built ahead of time by setup.py"


PLANTED = """#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    FILE *marker = fopen(getenv("PLANTED_MARKER"), "w");
    if (marker) fclose(marker);
}
"""


def test_a_cache_others_can_write_is_refused(cached_build, tmp_path):
    """A library planted where calibkern would load its build is never loaded — in a world-writable cache, as
    a group-writable file, or owned by another account — and the report says why; the same library in the
    user's own cache runs its code (the control that shows the marker would catch it)."""
    root, entry, _ = cached_build
    planted = tmp_path / "planted.so"
    (tmp_path / "planted.c").write_text(PLANTED)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(planted), str(tmp_path / "planted.c")], check=True)
    caches = {"world-writable": root}
    os.chmod(root, 0o777)
    for name in ("group-writable", "another account's", "control"):
        caches[name] = _private(tmp_path / name)
        _private(os.path.join(caches[name], os.path.basename(entry.directory)))
    for cache in caches.values():
        shutil.copy(planted, os.path.join(cache, os.path.basename(entry.directory), _jit.LIBRARY))
    group_writable = os.path.join(caches["group-writable"], os.path.basename(entry.directory), _jit.LIBRARY)
    os.chmod(group_writable, 0o775)
    others = os.path.join(caches["another account's"], os.path.basename(entry.directory), _jit.LIBRARY)
    if os.geteuid() == 0:
        os.chown(others, 65534, 65534)
    else:
        del caches["another account's"]
    marker = tmp_path / "planted-ran"
    out = run_python(script(FAKE_RECORD, """
        import os, calibkern
        from calibkern import _jit
        print({s.name: s for s in calibkern.backend_report()}["cpp"].detail)
        for name in os.environ["CACHES"].split(","):
            os.environ["CALIBKERN_CACHE"] = os.path.join(os.environ["TMP"], name)
            try:
                _jit.jit_load("a test")
            except ImportError as error:
                print(os.path.exists(os.environ["PLANTED_MARKER"]), error)
    """), env={"PLANTED_MARKER": str(marker), "TMP": str(tmp_path),
               "CACHES": ",".join(name for name in caches if name != "world-writable")})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("calibkern._C was built for torch 2.4.0, but torch")
    assert f"refusing the cpp build cache {root}: its group and others can write it (mode 0777)" in lines[0]
    assert lines[1].startswith(f"False refusing the cpp build cache {group_writable}: its group can write it "
                               "(mode 0775)")
    if os.geteuid() == 0:
        assert lines[2].startswith(f"False refusing the cpp build cache {others}: it belongs to uid 65534, not "
                                   "to you (uid 0)")
    assert lines[-1].startswith("True ") and "PyInit__C" in lines[-1]  # the control: loaded, and its code ran


@pytest.fixture
def broken_sources(tmp_path, monkeypatch):
    """A one-file source set that does not compile (the compiler fails in a fraction of a second) and a
    private cache for it: its cache entry, ready to build."""
    csrc = tmp_path / "csrc"
    csrc.mkdir()
    (csrc / "bindings.cpp").write_text("int broken = ;\n")
    monkeypatch.setattr(_build, "CSRC", str(csrc))
    monkeypatch.setenv("CALIBKERN_CACHE", str(_private(tmp_path / "cache")))
    entry = _jit.cache_entry()
    _private(entry.directory)
    return entry


def test_a_lock_left_by_a_killed_build_is_broken_and_a_compiler_error_is_kept(broken_sources, capfd):
    """A lock file still naming a holder that is gone (its flock went with it) is broken with a line on
    stderr; the build then runs, its compiler error is kept and reported, and the next try shows that error
    without compiling again."""
    entry = broken_sources
    with open(entry.path(_jit.LOCK), "w") as handle:
        handle.write("pid 4194303 on a-node-that-died since 2026-01-01 00:00:00 UTC\n")
    with pytest.raises(ImportError, match=r"compiling the cpp backend failed \(.*bindings.cpp:1:\d+: error: "):
        _jit.jit_load("a test")
    err = capfd.readouterr().err
    assert (f"breaking the build lock {entry.path(_jit.LOCK)}: its holder (pid 4194303 on a-node-that-died since "
            "2026-01-01 00:00:00 UTC) is gone") in err
    assert f"compiling the cpp backend into {entry.directory} (a test; no earlier build in " in err
    with open(entry.path(_jit.FAILED_MARKER)) as handle:
        assert _jit.is_compiler_error(handle.read())
    assert open(entry.path(_jit.LOCK)).read() == ""
    with pytest.raises(ImportError, match=r"bindings.cpp:1:\d+: error: .*delete .* to try again"):
        _jit.jit_load("a test")
    assert "compiling" not in capfd.readouterr().err


def test_a_cache_on_a_file_system_without_locks_is_a_clear_import_error(broken_sources, monkeypatch):
    """flock fails as on NFS without its lock service (ENOLCK): no build starts, and the error names the lock file
    and CALIBKERN_CACHE (the automatic backend choice then falls back with that reason)."""
    import errno
    import fcntl

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    entry = broken_sources
    with pytest.raises(ImportError, match=r"cannot lock .*build.lock .*set CALIBKERN_CACHE to a directory on a "
                                          r"local file system"):
        _jit.jit_load("a test")
    assert not os.path.exists(entry.path(_jit.FAILED_MARKER))  # nothing compiled, nothing recorded


WAIT_FOR_THE_BUILD = """
    import os
    from calibkern import _build, _jit
    _build.CSRC = os.environ["TEST_CSRC"]
    try:
        _jit.jit_load("a test")
    except ImportError as error:
        print(error)
"""


def test_processes_that_wait_get_the_compiler_error_or_a_timeout(broken_sources):
    """While one process builds, the others wait: one whose CALIBKERN_BUILD_TIMEOUT runs out stops with the
    holder and the lock file named; one that waits to the end gets the builder's compiler error (not a
    missing library) and compiles nothing itself."""
    entry = broken_sources
    lock = entry.path(_jit.LOCK)
    env = {k: v for k, v in os.environ.items() if k not in ("CALIBKERN_BACKEND", "PYTHONPATH")}
    env["TEST_CSRC"] = _build.CSRC
    with _jit.build_lock(lock, timeout=1):
        waiters = {timeout: subprocess.Popen([sys.executable, "-c", script(WAIT_FOR_THE_BUILD)], text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             env={**env, "CALIBKERN_BUILD_TIMEOUT": timeout})
                   for timeout in ("1", "300")}
        out, err = waiters["1"].communicate(timeout=300)
        assert out.startswith(f"waited 1 s for the cpp build held by pid {os.getpid()} on ")
        assert f"(lock file {lock}); raise CALIBKERN_BUILD_TIMEOUT" in out
        assert f"waiting for the cpp build of pid {os.getpid()} on " in err
        patient = waiters["300"]
        while "waiting for the cpp build" not in patient.stderr.readline():
            assert patient.poll() is None, patient.communicate()
        with pytest.raises(ImportError, match="error: "):
            _jit._compile(entry, "a test")
    out, err = patient.communicate(timeout=300)
    assert out.startswith("compiling the cpp backend failed (") and "bindings.cpp:1:" in out, out + err
    assert "cannot open shared object" not in out and "compiling the cpp backend into" not in err


# runs the cpp kernels and the reference on the same rows: which calibkern, how its extension was obtained, equal?
LOAD_AND_COMPARE = """
    import torch, calibkern
    from calibkern import _cpp
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(1000, 4, generator=g) * 3, torch.randint(0, 4, (1000,), generator=g)
    same = torch.allclose(calibkern.ece(z, y, backend="cpp"), calibkern.ece(z, y, backend="torch"), rtol=1e-6)
    print(calibkern.__file__)
    print(_cpp.HOW_BUILT)
    print(same)
"""


def _tree(root) -> dict:
    """Every path under ``root`` with its size and modification time."""
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in sorted(root.rglob("*"))}


def _wait_for(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} after {timeout:.0f} s"
        time.sleep(0.2)


@pytest.mark.slow
def test_killed_and_interrupted_builds_never_wedge_the_next_import(tmp_path, monkeypatch):
    """Real builds at first use, as an operator meets them: Ctrl-C (SIGINT to the process group, as a terminal
    sends it) mid-build raises KeyboardInterrupt and leaves no failure behind, so the next import builds; that
    build SIGKILLed mid-compile (a pre-empted job) leaves the lock's holder line, which the next builder breaks
    with a line on stderr; two processes then build one copy together within one build's time, equal to the
    reference; a second copy of the package (new paths and file times) loads it without compiling."""
    cache, source = tmp_path / "cache", _package_copy(tmp_path / "source")  # fixed while the checkout may change
    monkeypatch.setenv("CALIBKERN_CACHE", str(cache))
    monkeypatch.setattr(_build, "CSRC", str(source / "csrc"))
    entry = _jit.cache_entry()
    env = {k: v for k, v in os.environ.items() if k not in ("CALIBKERN_BACKEND", "PYTHONPATH")}
    code = script(FAKE_RECORD, LOAD_AND_COMPARE)

    def start(cwd=source):
        return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, cwd=cwd, start_new_session=True)

    def stop_mid_compile(proc, sig):
        """Once ``proc`` has written its build.ninja and its compilers run, send ``sig`` to its process group."""
        ninja_file = os.path.join(entry.path(f"{_jit.WORK_PREFIX}{proc.pid}"), "build.ninja")
        _wait_for(lambda: proc.poll() is not None or os.path.exists(ninja_file), "build.ninja")
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()
        os.killpg(proc.pid, sig)
        return proc.communicate(timeout=120)

    _, err = stop_mid_compile(start(), signal.SIGINT)
    assert "KeyboardInterrupt" in err and "compiling the cpp backend into" in err, err
    assert not os.path.exists(entry.path(_jit.FAILED_MARKER))
    assert open(entry.path(_jit.LOCK)).read() == ""  # released

    killed = start()  # the next import builds again, and is killed mid-compile
    stop_mid_compile(killed, signal.SIGKILL)
    assert open(entry.path(_jit.LOCK)).read().startswith(f"pid {killed.pid} on ")

    started = time.monotonic()
    ranks = [start() for _ in range(2)]
    results = [proc.communicate(timeout=600) for proc in ranks]
    elapsed = time.monotonic() - started
    for proc, (out, err) in zip(ranks, results):
        assert proc.returncode == 0, err
        how, same = out.split("\n")[1], out.split()[-1]
        assert how.startswith(f"built at first use in {entry.directory}, ") and same == "True", out
    errors = "".join(err for _, err in results)
    assert errors.count("compiling the cpp backend into") == 1, errors
    assert f"breaking the build lock {entry.path(_jit.LOCK)}: its holder (pid {killed.pid} on " in errors, errors
    assert sorted(os.listdir(entry.directory)) == sorted([_jit.LIBRARY, _jit.RECORD, _jit.LOCK])
    with open(entry.path(_jit.RECORD)) as handle:
        assert {k: v for k, v in json.load(handle).items() if k in entry.record} == entry.record
    print(f"two ranks after a killed build: {elapsed:.1f} s")

    copy = _package_copy(tmp_path / "copy", source)
    before = _tree(cache)
    started = time.monotonic()
    out, err = start(cwd=copy).communicate(timeout=300)
    file, how, same = out.split()[0], out.split("\n")[1], out.split()[-1]
    assert file.startswith(str(copy)) and same == "True", out + err
    assert how.startswith(f"built at first use in {entry.directory}, loaded from the cache"), how
    assert "compiling" not in err and _tree(cache) == before, err
    print(f"a second copy of the package: {time.monotonic() - started:.1f} s, nothing compiled")


def _package_copy(destination, origin=REPO):
    """``destination`` with the files of ``origin`` a user's ``pip install`` sees (no compiled extension, no
    build record, no caches), with new modification times, as a reinstall gives them."""
    ignore = shutil.ignore_patterns("*.so", "_build_config.py", "__pycache__")
    for folder in ("calibkern", "csrc"):
        shutil.copytree(os.path.join(origin, folder), destination / folder, ignore=ignore, copy_function=shutil.copy)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(origin, name), destination / name)
    return destination


@pytest.mark.slow
def test_plain_pip_install_gets_the_cpp_backend(tmp_path):
    """A fresh venv with the pinned torch, then a plain ``pip install <repo>`` (build isolation on): pip
    installs no other torch, and the first import builds the cpp backend for the torch that runs it."""
    source, venv = tmp_path / "src", tmp_path / "venv"
    _package_copy(source)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, timeout=900)
    install = subprocess.run([python, "-m", "pip", "install", "-v", "--disable-pip-version-check", str(source)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    log = install.stdout + install.stderr
    assert "Collecting torch" not in log and "Downloading torch" not in log
    out = run_python(script("""
        import torch, calibkern
        from calibkern import _cpp
        g = torch.Generator().manual_seed(0)
        z, y = torch.randn(4096, 4, generator=g) * 3, torch.randint(0, 4, (4096,), generator=g)
        print(torch.__version__, "cpp" in calibkern.available_backends(), _cpp.HOW_BUILT.split(" in ")[0])
        cpp, reference = calibkern.binned_stats(z, y, backend="cpp"), calibkern.binned_stats(z, y, backend="torch")
        print(torch.equal(cpp.counts, reference.counts) and torch.allclose(cpp.sum_conf, reference.sum_conf, rtol=1e-6))
        w = torch.rand(10)
        print(torch.allclose(calibkern.calibration_loss(z, y, w, backend="cpp"),
                             calibkern.calibration_loss(z, y, w, backend="torch"), rtol=1e-5, atol=1e-7))
    """), env={"CALIBKERN_CACHE": str(tmp_path / "cache")}, python=python, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [torch.__version__, "True", "built", "at", "first", "use", "True", "True"]
    assert "compiling the cpp backend" in out.stderr


@pytest.mark.slow
def test_sources_compile_against_the_newest_torch(tmp_path):
    """The newest torch the package index offers (C++20 headers) compiles every source: a syntax-only
    compile against the headers of its wheel, with the flags torch's tooling would pass."""
    fetched = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                              "-d", str(tmp_path), "torch"], capture_output=True, text=True, timeout=900)
    wheels = list(tmp_path.glob("torch-*.whl"))
    if fetched.returncode != 0 or not wheels:
        pytest.skip(f"no torch wheel to read headers from: {fetched.stderr[-500:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(tmp_path, [n for n in wheel.namelist() if n.startswith("torch/include/")])
    include = tmp_path / "torch" / "include"
    python_include = subprocess.run([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['include'])"],
                                    capture_output=True, text=True, check=True).stdout.strip()
    command = ["c++", "-fsyntax-only", "-std=c++20", *_build.cxx_flags(_build.march()), "-I", _build.CSRC,
               "-I", str(include), "-I", str(include / "torch" / "csrc" / "api" / "include"), "-I", python_include,
               "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    procs = [(path, subprocess.Popen([*command, path], stderr=subprocess.PIPE, text=True)) for path in _build.sources()]
    failures = {os.path.basename(path): proc.communicate(timeout=600)[1][-2000:] for path, proc in procs
                if proc.wait() != 0}
    assert not failures, f"{wheels[0].name}: {failures}"


@pytest.mark.skipif(os.environ.get("CI") != "true", reason="only CI promises the ahead-of-time build")
def test_ci_builds_the_cpp_backend_ahead_of_time():
    """Under CI=true setup.py fails the install when the extension does not compile, and the suite runs the
    ahead-of-time build, never a silent fallback to the reference."""
    assert "cpp" in calibkern.available_backends()
    assert backends.get_module("cpp").HOW_BUILT.startswith("built ahead of time")
