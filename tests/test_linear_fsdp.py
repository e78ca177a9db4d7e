"""linear_kd_loss under FSDP2 (torch.distributed.fsdp.fully_shard) on CPU with 2 gloo ranks.

The lm_head is its own FSDP unit, so outside its forward its weight is a DTensor sharded by rows:
linear_kd_loss gathers it once per call and its gradient must reach the shard, averaged over the
ranks as FSDP2 averages every other gradient. The two ranks' step must equal one process
averaging the two ranks' losses.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastkd

VOCAB, HIDDEN, TEACHER_HIDDEN, LEAD = 301, 16, 24, (2, 5)
OPTIONS = dict(temperature=2.0, alpha=0.5, student_softcap=5.0, chunk_size=4)
GROUP_TIMEOUT_S = 120


class _Student(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.layer = torch.nn.Linear(HIDDEN, HIDDEN)
        self.lm_head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens):  # hidden states: the lm_head runs inside the fused loss
        return torch.tanh(self.layer(self.embed(tokens)))


def _teacher_weight():
    return torch.randn(VOCAB, TEACHER_HIDDEN, generator=torch.Generator().manual_seed(5)) * 0.4


def _batch(rank):
    gen = torch.Generator().manual_seed(10 + rank)
    tokens = torch.randint(0, VOCAB, LEAD, generator=gen)
    teacher_hidden = torch.randn(*LEAD, TEACHER_HIDDEN, generator=gen)
    labels = torch.randint(0, VOCAB, LEAD, generator=gen)
    labels.view(-1)[: 1 + 2 * rank] = -100  # a different count of ignored rows per rank
    return tokens, teacher_hidden, labels


def _loss(model, rank, dtype=torch.float32):
    """dtype bf16: the hidden states in bf16 against the fp32 (master) lm_head, which the loss
    casts once when it gathers it; one process casts the full weight itself."""
    tokens, teacher_hidden, labels = _batch(rank)
    head = model.lm_head
    weight, bias = head.weight, head.bias
    if dtype != torch.float32 and not _is_dtensor(weight):
        weight, bias = weight.to(dtype), bias.to(dtype)
    return fastkd.linear_kd_loss(model(tokens).to(dtype), weight, teacher_hidden.to(dtype),
                                 _teacher_weight().to(dtype), labels, student_bias=bias,
                                 **OPTIONS)


def _is_dtensor(tensor):
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size,
                            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _Student()
        fully_shard(model.lm_head)
        fully_shard(model)
        loss = _loss(model, rank, dtype)
        weight_was_sharded = isinstance(model.lm_head.weight, DTensor)
        loss.backward()
        grads = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        results[dtype] = {"loss": loss.detach(), "grads": grads, "sharded": weight_was_sharded}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _run_group(world_size, tmp_path):
    """Every rank's results; a worker's exception (a missed collective times out in gloo after
    GROUP_TIMEOUT_S) is raised here with its traceback."""
    mp.start_processes(_worker, args=(world_size, str(tmp_path / "rendezvous"), str(tmp_path)),
                       nprocs=world_size, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]


@pytest.mark.skipif(not dist.is_available(), reason="torch built without torch.distributed")
def test_fsdp2_two_ranks_equal_one_process(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    per_rank = _run_group(2, tmp_path)
    for dtype, tol in ((torch.float32, dict(rtol=1e-5, atol=1e-7)),
                       (torch.bfloat16, dict(rtol=2.0**-7, atol=1e-4))):
        results = [r[dtype] for r in per_rank]
        assert all(r["sharded"] for r in results), "the lm_head weight was not a DTensor"
        model = _Student()
        losses = [_loss(model, rank, dtype) for rank in range(2)]
        (sum(losses) / 2).backward()
        for rank, result in enumerate(results):
            torch.testing.assert_close(result["loss"], losses[rank].detach(), **tol)
            for name, param in model.named_parameters():
                grad = result["grads"][name]
                assert grad.dtype == param.dtype, f"{dtype} rank {rank}: {name} {grad.dtype}"
                torch.testing.assert_close(grad, param.grad, **tol,
                                           msg=f"{dtype} rank {rank}: {name}")
