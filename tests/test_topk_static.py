"""The top-k kernel compiles for sm_90a without register spills (no GPU needed).

Each configuration is compiled ahead of time by fastkd.bench.static_report's compiler path, fed
with kd_topk.stand_in_launch (the arguments and specialization topk_rows passes). That needs the
real kernels, not the interpreter's, so it runs in a subprocess without TRITON_INTERPRET.
"""

import json
import os
import subprocess
import sys

import pytest

from fastkd.bench import static_report

pytestmark = pytest.mark.skipif(
    static_report.cuobjdump_path() is None,
    reason="cuobjdump is not in this triton wheel (triton/backends/nvidia/bin): cannot read SASS",
)

# (tail, vocab, k, dtype, temperature): the on-chip 8192 class (whole row in registers) and an
# LLM vocabulary on the two-sweep loop, both tails; T = 1 shares the CE softmax.
CONFIGS = [
    ("renormalize", 8000, 64, "bf16", 2.0),
    ("bucket", 8000, 64, "bf16", 2.0),
    ("bucket", 128256, 64, "bf16", 1.0),
    ("renormalize", 128256, 2048, "fp32", 2.0),
]

_SCRIPT = """
import json, sys
import torch
from fastkd.bench import static_report
from fastkd.kernels import kd_topk

rows = []
for tail, vocab, k, dtype, temperature in json.loads(sys.argv[1]):
    launch = dict(vocab=vocab, k=k, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype],
                  tail=tail, temperature=temperature)
    static_report._launch_arguments = lambda config, launch=launch: kd_topk.stand_in_launch(
        **launch)
    row = static_report.compile_config(static_report.KernelConfig("kd_fwd", "sm_90a", dtype,
                                                                  vocab))
    row["config"] = f"{tail} V={vocab} k={k} {dtype} T={temperature}"
    rows.append(row)
print(json.dumps(rows))
"""


@pytest.fixture(scope="module")
def rows():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CONFIGS)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_topk_kernel_compiles_without_spills(rows):
    assert len(rows) == len(CONFIGS)
    for row in rows:
        assert "error" not in row, f"{row['config']}: {row.get('error')}"
        assert row["registers"] > 0 and row["ldg"] > 0 and row["stg"] > 0, row["config"]
        assert row["mufu_ex2"] > 0, row["config"]
        assert not row["spills"], (
            f"{row['config']}: {row['registers']} registers, {row['stack_bytes']} B stack, "
            f"{row['ldl']} LDL / {row['stl']} STL")
