"""The shipped Triton kernels compile for sm_90a without register spills.

Compiles ahead of time (no GPU) with the same specialization a real launch gets, then reads the
cubin with the cuobjdump from the triton wheel (fastkd.bench.static_report). The full matrix of
configurations and sm_80 are in `fastkd-bench --static`; this test compiles scope="core": every
flag combination of the on-chip 8192 class (the whole row in registers, where register pressure
peaks), the training calls of the two-sweep loop, and the backward scale kernel.
"""

import pytest

from fastkd.bench import static_report

pytestmark = pytest.mark.skipif(
    static_report.cuobjdump_path() is None,
    reason="cuobjdump is not in this triton wheel (triton/backends/nvidia/bin): cannot read SASS",
)


@pytest.fixture(scope="module")
def sm90_rows():
    configs = static_report.shipped_configs(archs=("sm_90a",), scope="core")
    return static_report.collect(configs)


def _label(row):
    return f"{row['arch']} {row['config']}"


def test_every_core_config_compiles_and_is_measured(sm90_rows):
    failed = [f"{_label(r)}: {r['error']}" for r in sm90_rows if "error" in r]
    assert not failed, "\n".join(failed)
    kernels = {r["kernel"] for r in sm90_rows}
    assert kernels == {"kd_fwd", "scale_rows"}
    for row in sm90_rows:
        # A real cubin: registers allocated, global memory read and written.
        assert row["registers"] > 0, _label(row)
        assert row["ldg"] > 0 and row["stg"] > 0, _label(row)


def test_report_matches_launch_configs(sm90_rows):
    from fastkd.kernels import kd_loss as kernels

    for row in sm90_rows:
        if row["kernel"] == "kd_fwd":
            expected = kernels.forward_config(row["vocab"])
            assert (row["block_v"], row["num_warps"]) == (
                expected["BLOCK_V"], expected["num_warps"]), _label(row)
            # The forward's softmaxes are exponentials: the SFU must show up in the SASS.
            assert row["mufu_ex2"] > 0, _label(row)
        else:
            assert (row["block_v"], row["num_warps"]) == (
                kernels.SCALE_BLOCK_V, kernels.SCALE_NUM_WARPS)
            assert row["mufu_ex2"] == 0


def test_no_register_spills_on_sm90a(sm90_rows):
    spilling = [
        f"{_label(r)}: {r['registers']} registers, {r['stack_bytes']} B stack, "
        f"{r['local_bytes']} B local, {r['ldl']} LDL / {r['stl']} STL"
        for r in sm90_rows if r.get("spills")
    ]
    assert not spilling, "register spills:\n" + "\n".join(spilling)
