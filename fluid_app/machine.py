"""The machine a bench ran on, named in its report and its table.

Why: a speed figure means little without its machine. Two 2-core CPUs of one cloud differed by
1.7x in AR speed, and whether a CPU has AMX decides which bfloat16 guarantees hold, so
``fluid bench`` names the CPU model and its cores itself: the README's table then comes from
one command, machine included, instead of a figure and a hand-written caption.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that change CPU kernels' speed or bits


def cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor's ``key: value`` lines of a Linux ``/proc/cpuinfo``."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends at its blank line
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_description(fields: dict[str, str]) -> tuple[str, list[str]]:
    """The CPU model and those of :data:`CPU_FLAGS` it has, from :func:`cpuinfo_fields`."""
    flags = set(fields.get("flags", "").split())
    return fields.get("model name", ""), [flag for flag in CPU_FLAGS if flag in flags]


def describe() -> dict[str, object]:
    """``{"cpu": model, "cpu_flags": [...], "cores": logical cores this process may use, "system": ...}``."""
    model, flags = "", []
    info = Path("/proc/cpuinfo")
    if info.is_file():
        model, flags = cpu_description(cpuinfo_fields(info.read_text(encoding="utf-8", errors="replace")))
    elif platform.system() == "Darwin":
        try:
            model = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                   timeout=5, check=False).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            model = ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or platform.processor() or platform.machine() or "unknown CPU", "cpu_flags": flags,
            "cores": cores, "system": platform.system()}


def machine_text(machine: dict[str, object]) -> str:
    """One line for a table: ``AMD EPYC (avx2, avx512f), 2 cores``."""
    flags = machine.get("cpu_flags") or []
    named = f"{machine['cpu']} ({', '.join(flags)})" if flags else str(machine["cpu"])
    return f"{named}, {machine['cores']} cores"
