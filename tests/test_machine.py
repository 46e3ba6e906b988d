"""The machine a bench names: the CPU model, the flags that change CPU kernels, the cores."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fluid_app.machine import cpu_description, cpuinfo_fields, describe, machine_text

# Two processors of a Linux /proc/cpuinfo, shortened; the second differs so that reading past
# the first block shows.
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_bf16x
bogomips\t: 5200.00

processor\t: 1
model name\t: Other CPU
flags\t\t: amx_bf16

"""


def test_the_first_processors_model_and_known_flags_are_read():
    fields = cpuinfo_fields(CPUINFO)
    assert fields["model name"] == "AMD EPYC 9R14" and fields["vendor_id"] == "AuthenticAMD"
    model, flags = cpu_description(fields)
    assert model == "AMD EPYC 9R14"
    assert flags == ["avx2", "avx512f", "avx512_bf16"]  # whole flags only: amx_bf16x is not amx_bf16
    assert machine_text({"cpu": model, "cpu_flags": flags, "cores": 2}) == "AMD EPYC 9R14 (avx2, avx512f, avx512_bf16), 2 cores"
    assert machine_text({"cpu": "Apple M2", "cpu_flags": [], "cores": 8}) == "Apple M2, 8 cores"


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads a Linux /proc/cpuinfo")
def test_this_machine_is_named_as_lscpu_and_nproc_name_it():
    machine = describe()
    grep = subprocess.run(["grep", "-m1", "^model name", "/proc/cpuinfo"], capture_output=True, text=True, check=True)
    assert machine["cpu"] == grep.stdout.split(":", 1)[1].strip()
    assert machine["cores"] == int(subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout)
    assert machine["cores"] <= os.cpu_count()
