"""KDTrainer under 2-process DDP and FSDP2 (gloo, CPU) against one process on the whole batch.

One spawn of 2 workers runs every case. Each worker trains one optimiser step of 2 micro-batches
of 1 sequence on its share of 4 sequences with uneven label counts; the update must equal the
single-process update of the mean loss over all 4 (fastkd.reference on explicit logits).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import fastkd  # noqa: E402

GROUP_TIMEOUT_S = 240
WORLD = 2
CASES = {
    "ddp_logits": dict(fused_linear=False),
    "ddp_fused": dict(fused_linear=True),
    "fsdp2_logits": dict(fused_linear=False, fsdp=True),
    "fsdp2_fused": dict(fused_linear=True, fsdp=True),
    # An untied lm_head sharded as its own unit: a DTensor inside the student's forward.
    "fsdp2_head_unit_logits": dict(fused_linear=False, fsdp=True, student="llama"),
    "fsdp2_head_unit_fused": dict(fused_linear=True, fsdp=True, student="llama"),
}
if not hasattr(fastkd, "linear_kd_loss"):  # it also gathers a sharded head for KDTrainer
    CASES = {k: v for k, v in CASES.items() if not v["fused_linear"] and "student" not in v}


def _models(student_arch: str = "gpt2"):
    from hf_models import build

    teacher, _ = build("llama", seed=1, hidden=48, layers=2)
    student, _ = build(student_arch, seed=2, hidden=32, layers=2)
    return student.double(), teacher.double().eval()


def _rows():
    from hf_models import token_batches

    return token_batches(2, batch_size=2, seed=4)


def _full(tensor):
    full_tensor = getattr(tensor, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else tensor).detach().clone()


def run_case(tmp_dir: str, case: dict) -> dict:
    """One step of KDTrainer.train() under DDP (accelerate wraps the student)."""
    from test_hf_trainer import KD, make_args

    import fastkd.hf as fhf

    student, teacher = _models()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    args = make_args(tmp_dir, 1, 2, ddp_backend="gloo")
    trainer = fhf.KDTrainer(model=student, teacher_model=teacher, args=args,
                            train_dataset=_rows(), fused_linear=case["fused_linear"], **KD)
    trainer.train()
    wrapped = type(trainer.model_wrapped).__name__
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    return {"update": {n: p.detach() - before[n] for n, p in student.named_parameters()},
            "loss": logs["loss"], "wrapped": wrapped}


def run_fsdp2_case(tmp_dir: str, case: dict) -> dict:
    """One accumulated step of KDTrainer.compute_loss on an FSDP2 (fully_shard) student.

    accelerate turns FSDP on only for accelerator devices (it keeps MULTI_CPU as DDP), so
    Trainer.train() cannot shard on CPU; the student is sharded here with torch's fully_shard
    and the Trainer's step is replayed: the step's token count from the trainer, micro-batch
    backward with the gradient reduce-scatter on the last one.
    """
    from test_hf_trainer import KD, LR, make_args
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import default_data_collator

    import fastkd.hf as fhf

    student, teacher = _models(case.get("student", "gpt2"))
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = fhf.KDTrainer(model=student, teacher_model=teacher,
                            args=make_args(tmp_dir, 1, 2, ddp_backend="gloo"),
                            train_dataset=_rows(), fused_linear=case["fused_linear"], **KD)
    mesh = init_device_mesh("cpu", (WORLD,))
    for block in student.base_model.layers if "student" in case else student.transformer.h:
        fully_shard(block, mesh=mesh)
    if "student" in case:
        fully_shard(student.lm_head, mesh=mesh)
    fully_shard(student, mesh=mesh)
    rank = dist.get_rank()
    rows = _rows()
    micro = [default_data_collator([row]) for row in rows[2 * rank: 2 * rank + 2]]
    count = trainer._get_num_items_in_batch(micro, torch.device("cpu"))
    student.train()
    total = torch.zeros((), dtype=torch.float64)
    for i, batch in enumerate(micro):
        student.set_requires_gradient_sync(i == len(micro) - 1)
        loss = trainer.compute_loss(student, batch, num_items_in_batch=count)
        loss.backward()
        total += loss.detach().double()
    dist.all_reduce(total)
    grads = {n: _full(p.grad) for n, p in student.named_parameters()}
    sharded = type(next(student.parameters())).__name__
    return {"update": {n: -LR * grads[n] for n in before}, "loss": float(total) / WORLD,
            "wrapped": f"{type(student).__name__} ({sharded} parameters)"}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        results = {}
        for name, case in CASES.items():
            try:
                run = run_fsdp2_case if case.get("fsdp") else run_case
                results[name] = run(os.path.join(out_dir, f"{name}{rank}"), case)
            except Exception:  # reported per case: one unsupported mode keeps the others
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf_dist")
    context = mp.start_processes(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError("the 2-process group did not finish in time")
    except Exception as exc:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        errors = "".join(p.read_text() for p in sorted(tmp.glob("rank*.err")))
        raise AssertionError(errors or str(exc)) from exc
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    from test_hf_trainer import reference_step

    results = {}
    for arch in ("gpt2", "llama"):
        student, teacher = _models(arch)
        results[arch] = reference_step(student, teacher, _rows())
    return results


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_make_the_single_process_update(results, single_process, name):
    from test_hf_trainer import assert_updates_close

    loss, expected = single_process[CASES[name].get("student", "gpt2")]
    for rank in range(WORLD):
        result = results[rank][name]
        assert "error" not in result, result.get("error")
        wrapped = "FSDP" if CASES[name].get("fsdp") else "DistributedDataParallel"
        if CASES[name].get("fsdp"):
            assert "DTensor" in result["wrapped"]
        assert wrapped in result["wrapped"]
        assert result["loss"] == pytest.approx(float(loss), rel=1e-6)
        assert_updates_close(result["update"], expected)
