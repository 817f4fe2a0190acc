"""Which int8 products are exact under each oneDNN instruction set: the reason for contract 2's part ranges.

    python -m bench.int8_saturation [--out reports/int8_saturation.json]

oneDNN's int8 kernels without VNNI (SSE4.1, AVX2, AVX-512 without VNNI) multiply u8 x s8
pairs and add each pair in int16 with saturation (vpmaddubsw); a signed operand is made
unsigned by adding 128 first. So full-range operands can saturate, and a saturated sum is a
wrong integer that no later step can detect. For each instruction-set cap (a subprocess with
ONEDNN_MAX_CPU_ISA; none = this machine's best) this runs torch._int_mm (matrix products)
and oneDNN's int8 convolution on operands at the extremes of two ranges, and compares with
exact binary64 products: the full int8 range (+-127, -128), and contract 2's parts (u8 in
[0, 127] with zero point 64 for the convolution's input; s8 in [-64, 63] otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.common import REPO_ROOT, REPORTS_DIR, module_command, run_main, write_json

ISAS = ("SSE41", "AVX2", "AVX512_CORE", None)

_SCRIPT = r"""
import json, torch
import torch.nn.functional as F
from diffcodec.exact2_products import _qconv_call, _qconv_pack
out = {}
for name, a_lo, a_hi, w_lo, w_hi in (("full range", -128, 127, -128, 127), ("contract 2 parts", -64, 63, -64, 63)):
    ok = True
    for a_val in (a_lo, a_hi):
        for w_val in (w_lo, w_hi):
            a = torch.full((64, 1152), a_val, dtype=torch.int8)
            w = torch.full((1152, 32), w_val, dtype=torch.int8)
            ok &= torch.equal(torch._int_mm(a, w).double(), a.double() @ w.double())
    out[name + ": torch._int_mm"] = bool(ok)
    # the convolution: u8 input (zero point 64; full range 0..255, parts 0..127), s8 weights
    ok = True
    u_hi = 255 if name == "full range" else 127
    for u in (0, u_hi):
        for w_val in (w_lo, w_hi):
            x = torch.full((1, 2 * 128, 6, 6), u, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
            w = torch.full((32, 2 * 128, 3, 3), w_val, dtype=torch.int8)
            got = _qconv_call(_qconv_pack(w, 1, 1), x, 32, 1, 1)
            want = F.conv2d(x.double() - 64, w.double(), padding=1)
            ok &= torch.equal(got.double(), want)
    out[name + ": int8 convolution"] = bool(ok)
print(json.dumps(out))
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.int8_saturation", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPORTS_DIR / "int8_saturation.json"))
    args = p.parse_args(argv)
    rows = {}
    for isa in ISAS:
        env = {k: v for k, v in os.environ.items() if k != "ONEDNN_MAX_CPU_ISA"}
        env["PYTHONPATH"] = str(REPO_ROOT)
        if isa:
            env["ONEDNN_MAX_CPU_ISA"] = isa
        proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(proc.stderr.strip().splitlines()[-1])
        rows[isa or "uncapped"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(isa or "uncapped", rows[isa or "uncapped"], file=sys.stderr)
    write_json(Path(args.out), {"kind": "int8_saturation", "exact": rows,
                                "command": module_command("bench.int8_saturation", argv)})
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
