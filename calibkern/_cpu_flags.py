"""Which instruction-set extensions a build of calibkern._C needs, and whether this CPU has them.

Standard library only: setup.py loads this file by path at build time, before the package is importable.
"""

from __future__ import annotations


def cpu_flags() -> frozenset[str] | None:
    """This CPU's instruction-set flags as /proc/cpuinfo names them; None where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def missing_cpu_flags(required, available) -> list[str]:
    """The flags of ``required`` that ``available`` lacks; none when ``available`` is unknown (None)."""
    return [] if available is None else [flag for flag in required if flag not in available]
