"""bench.int8_saturation: the products it checks are exact on this machine for contract 2's part ranges."""

from __future__ import annotations

import json
import subprocess
import sys

from bench import int8_saturation
from bench.common import REPO_ROOT


def test_contract_2_parts_are_exact_here_and_every_case_is_reported():
    proc = subprocess.run([sys.executable, "-c", int8_saturation._SCRIPT], capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(got) == {f"{r}: {k}" for r in ("full range", "contract 2 parts")
                        for k in ("torch._int_mm", "int8 convolution")}
    assert got["contract 2 parts: torch._int_mm"] and got["contract 2 parts: int8 convolution"]
