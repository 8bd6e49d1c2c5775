"""The fast backend for a plain ``pip install``: the extension matches the running torch (built ahead of time
or at first use), no build downloads a second torch, the sources compile against the newest torch's headers,
and every unavailable backend says why (``calibkern.backend_report()``, ``calibkern info``)."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

import calibkern
from calibkern import _build, backends

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
    assert _build.first_lines(log) == "foo.cpp:3:1: error: expected ';'"
    assert _build.first_lines("") == "no output"


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


@pytest.mark.slow
def test_build_at_first_use_by_two_ranks_at_once(tmp_path):
    """Two processes that find no usable extension build one copy into the cache (torch's file lock) and
    both run the cpp kernels, equal to the reference."""
    code = script(FAKE_RECORD, """
        import torch, calibkern
        from calibkern import _cpp
        g = torch.Generator().manual_seed(0)
        z, y = torch.randn(1000, 4, generator=g) * 3, torch.randint(0, 4, (1000,), generator=g)
        same = torch.allclose(calibkern.ece(z, y, backend="cpp"), calibkern.ece(z, y, backend="torch"), rtol=1e-6)
        print(_cpp.HOW_BUILT.split(" (")[0], same)
    """)
    env = {"CALIBKERN_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, **env}) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (out, err) in zip(procs, results):
        assert proc.returncode == 0, err
        assert out.startswith(f"built at first use in {tmp_path}") and out.strip().endswith("True"), out
    assert len(list(tmp_path.glob("*/calibkern_C.so"))) == 1


def _package_copy(destination):
    """The files a user's ``pip install`` sees: no compiled extension, no build record, no caches."""
    ignore = shutil.ignore_patterns("*.so", "_build_config.py", "__pycache__")
    shutil.copytree(os.path.join(REPO, "calibkern"), destination / "calibkern", ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(os.path.join(REPO, name), destination / name)


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
