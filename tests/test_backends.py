"""Backend registry and selection (docs/backends.md)."""

import os
import subprocess
import sys

import pytest
import torch

import calibkern as ck
from calibkern import backends


def test_reference_is_always_available():
    assert ck.available_backends()[0] == "torch"


def test_auto_picks_cpp_for_cpu_tensors_when_built():
    name, _ = backends.resolve("auto", torch.device("cpu"))
    assert name == ("cpp" if backends.is_available("cpp") else "torch")


def test_set_backend_and_environment_variable():
    ck.set_backend("torch")
    assert ck.get_backend() == "torch"
    ck.set_backend(None)
    env = dict(os.environ, CALIBKERN_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", "import calibkern; print(calibkern.get_backend())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "torch"


def test_missing_backend_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(backends._probe_cache, "cpp", ImportError("no module named calibkern._C"))
    with pytest.raises(ck.BackendUnavailableError, match="build the C\\+\\+ extension"):
        ck.ece(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), backend="cpp")
    with pytest.raises(ck.BackendUnavailableError, match="not available"):
        ck.set_backend("cpp")
    assert backends.resolve("auto", torch.device("cpu"))[0] == "torch"  # auto never fails


def test_package_imports_without_triton_being_imported():
    # Only the import is checked: the first custom-op call enters torch's dynamo machinery, which itself
    # imports triton when it is installed, so TRITON_INTERPRET must be set before calibkern runs an op.
    code = "import sys, calibkern, torch; print('triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_deterministic_switch_follows_torch():
    assert not ck.is_deterministic()
    ck.set_deterministic(True)
    assert ck.is_deterministic()
    ck.set_deterministic(False)
    torch.use_deterministic_algorithms(True)
    try:
        assert ck.is_deterministic()
    finally:
        torch.use_deterministic_algorithms(False)


def test_missing_cpu_flags():
    from calibkern._cpu_flags import missing_cpu_flags

    assert missing_cpu_flags(("avx2", "avx512f", "fma"), frozenset({"fma", "avx2"})) == ["avx512f"]
    assert missing_cpu_flags(("avx512f",), None) == []  # no /proc/cpuinfo: nothing to check against
    assert missing_cpu_flags((), frozenset()) == []


@pytest.mark.skipif(not backends.is_available("cpp"), reason="the C++ extension is not built")
def test_this_build_needs_only_what_this_cpu_has():
    from calibkern._build_config import CPP_CPU_FLAGS
    from calibkern._cpu_flags import cpu_flags, missing_cpu_flags

    assert missing_cpu_flags(CPP_CPU_FLAGS, cpu_flags()) == []


@pytest.mark.skipif(not backends.is_available("cpp"), reason="the C++ extension is not built")
def test_a_native_build_for_another_cpu_leaves_cpp_unavailable():
    """A build that needs an instruction this CPU lacks is not loaded (it would die of an illegal
    instruction): with the build at first use turned off, auto falls back, and asking for cpp says why and
    how to fix it."""
    code = ("import sys, types, torch\n"
            "config = types.ModuleType('calibkern._build_config')\n"
            "config.CPP_CPU_FLAGS = ('no_such_isa_extension',)\n"
            "sys.modules['calibkern._build_config'] = config\n"
            "import calibkern\n"
            "print(calibkern.available_backends(), calibkern.backends.resolve('auto', torch.device('cpu'))[0])\n"
            "try:\n"
            "    calibkern.ece(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), backend='cpp')\n"
            "except calibkern.BackendUnavailableError as error:\n"
            "    print(error)\n")
    env = {k: v for k, v in os.environ.items() if k != "CALIBKERN_BACKEND"} | {"CALIBKERN_JIT": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    available, message = out.strip().split("\n", 1)
    assert "cpp" not in available and available.endswith(" torch")
    assert "compiled for CPU instructions this CPU lacks (no_such_isa_extension)" in message
    assert "CALIBKERN_PORTABLE=1" in message


def test_set_deterministic_is_deprecated():
    """Every kernel is always deterministic: the switch warns and changes no result."""
    g = torch.Generator().manual_seed(0)
    z, y, accuracy = torch.randn(4096, 4, generator=g) * 3, torch.randint(0, 4, (4096,), generator=g), torch.rand(10)
    before = ck.calibration_loss(z, y, accuracy), ck.binned_stats(z, y).sum_conf
    with pytest.deprecated_call(match="always deterministic"):
        ck.set_deterministic(True)
    after = ck.calibration_loss(z, y, accuracy), ck.binned_stats(z, y).sum_conf
    assert all(torch.equal(a, b) for a, b in zip(before, after))
