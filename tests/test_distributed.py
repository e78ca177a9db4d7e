"""fastkd.distributed: vocab-parallel KD over torch.distributed and the data-parallel recipe.

Three layers, cheapest first:
- the two backends' shard statistics and shard gradients, with R shards simulated in one process
  (the all-gather replaced by torch.stack), against the single-device reference;
- the public kd_loss in real gloo process groups of 2 and 3 CPU processes, one spawn per world
  size running every case, against the reference on the concatenated vocabulary;
- DDP steps of a small LM with fastkd.KDLoss and gradient accumulation, against one process on
  the concatenated batch.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastkd
import fastkd.distributed as fkd_dist
from fastkd import _torch_backend, reference
from fastkd._dense import _vocab_parallel_backend
from fastkd._spec import ONLINE_DIVERGENCES, ROW_LOSS, check_loss_options

IGNORE = -100
# The interpreter evaluates masked-off lanes too (-inf - -inf there); kernels discard them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
# A spawned group that has not finished by then is hung (a missed collective); fail, don't wait.
GROUP_TIMEOUT_S = 120


# ---------------------------------------------------------------------------------------------
# Test data, built identically in the pytest process and in every worker from a case's seed.


def shard_bounds(vocab: int, sizes) -> list[tuple[int, int]]:
    """[start, stop) of each rank's columns."""
    assert sum(sizes) == vocab
    starts = [sum(sizes[:r]) for r in range(len(sizes))]
    return [(start, start + size) for start, size in zip(starts, sizes, strict=True)]


def make_inputs(case: dict):
    """Full-vocabulary (student, teacher, labels, upstream gradient) of a case, on CPU."""
    gen = torch.Generator().manual_seed(case["seed"])
    vocab, lead = case["vocab"], case["lead"]
    shift = case.get("shift", 0.0)
    student = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * 3 + shift
    teacher = torch.randn(*lead, vocab, generator=gen, dtype=torch.float64) * 3 + shift
    labels = torch.randint(0, vocab, lead, generator=gen)
    flat_labels = labels.view(-1)
    # A label in every shard, the first and last global ids, and ignored rows.
    bounds = shard_bounds(vocab, case["sizes"])
    for row, (start, stop) in enumerate(bounds):
        flat_labels[row] = (start + stop) // 2
    flat_labels[len(bounds)] = 0
    flat_labels[len(bounds) + 1] = vocab - 1
    flat_labels[-1] = IGNORE
    flat_labels[-2] = IGNORE
    if case.get("masked"):
        s2, t2 = student.view(-1, vocab), teacher.view(-1, vocab)
        # Row 0: a whole shard masked for both models (its maxima are -inf).
        start, stop = bounds[-1]
        s2[0, start:stop] = float("-inf")
        t2[0, start:stop] = float("-inf")
        # Row 1: scattered teacher masks (0 * log 0 terms), the student masked on half of them.
        holes = torch.rand(s2.shape[1], generator=gen) < 0.3
        t2[1, holes] = float("-inf")
        s2[1, holes & (torch.arange(vocab) % 2 == 0)] = float("-inf")
        # Labels of rows 0 and 1 where the student is not masked (else CE is inf).
        flat_labels[0] = bounds[0][0]
        flat_labels[1] = int(torch.nonzero(~holes)[0])
    if "teacher_step" in case:
        # Teacher logits jump by `amount` on columns [lo, hi): online statistics that anchor on
        # the first block would lose fp32 precision here.
        lo, hi, amount = case["teacher_step"]
        teacher[..., lo:hi] += amount
    if case.get("out_of_range"):
        flat_labels[2] = vocab  # one past the last shard: NaN loss for that row
    if not case.get("labels", True):
        labels = None
    dtype = case.get("dtype", torch.float32)
    grad_output = torch.rand(lead, generator=gen, dtype=torch.float64) + 0.5
    return student.to(dtype), teacher.to(dtype), labels, grad_output


def loss_options(case: dict) -> dict:
    options = {
        "temperature": case.get("temperature", 1.0),
        "alpha": case.get("alpha"),
        "reduction": case.get("reduction", "mean"),
        "ignore_index": IGNORE,
    }
    for name in ("divergence", "beta", "skew", "label_smoothing", "z_loss"):
        if name in case:
            options[name] = case[name]
    if "normalizer" in case:
        options["normalizer"] = case["normalizer"]
    return options


def reference_result(case: dict, unit_upstream: bool = False):
    """Loss and full-vocabulary gradients from fastkd.reference in float64; the upstream
    gradient of reduction="none" is the case's grad_output, or ones with unit_upstream."""
    student, teacher, labels, grad_output = make_inputs(case)
    s = student.double().requires_grad_()
    t = teacher.double().requires_grad_(bool(case.get("mutual")))
    loss = reference.kd_loss(s, t, labels, **loss_options(case))
    upstream = torch.ones_like(loss) if unit_upstream or loss.dim() == 0 else grad_output
    # An out-of-range row's loss is NaN; keep NaN out of the gradient of the others.
    loss.backward(torch.where(loss.isnan(), 0.0, upstream) if loss.dim() > 0 else upstream)
    return loss.detach(), s.grad, (t.grad if case.get("mutual") else None)


# ---------------------------------------------------------------------------------------------
# Layer 1: the backends' two steps, shards simulated in one process.


def simulate_shards(case: dict, device):
    """Row losses and concatenated w=1 gradients, computing each shard's part separately."""
    student, teacher, labels, _ = make_inputs(case)
    vocab = case["vocab"]
    student, teacher = student.to(device), teacher.to(device)
    labels = labels.to(device).view(-1) if labels is not None else None
    s2, t2 = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
    options = check_loss_options(
        has_labels=labels is not None,
        **{k: v for k, v in loss_options(case).items() if k != "normalizer"})
    backend = _vocab_parallel_backend(student.device)
    bounds = shard_bounds(vocab, case["sizes"])
    shards = [(s2[:, a:b], t2[:, a:b], a) for a, b in bounds]
    n_rows = s2.shape[0]
    # A backend's statistics may come as (N, S) or as (G, N, S) slabs: one slab per shard here.
    stats = [backend.shard_stats(s, t, labels, vocab_start=a, options=options)
             .reshape(-1, n_rows, _torch_backend.NUM_STATS) for s, t, a in shards]
    state = _torch_backend.combine_stats(torch.cat(stats), options)
    sums = None
    if options.divergence_id not in ONLINE_DIVERGENCES:
        sums = sum(backend.shard_divergence_sums(state, s, t, options).reshape(-1, n_rows, 3)
                   .sum(dim=0) for s, t, _ in shards)
    row_stats, a_sum, b_sum = _torch_backend.row_statistics(state, sums, labels, options)
    weight = torch.ones((), dtype=row_stats.dtype, device=device)
    grads_s, grads_t = [], []
    for s, t, a in shards:
        grad_s = torch.empty_like(s)
        grad_t = torch.empty_like(t) if case.get("mutual") else None
        backend.shard_grads(state, a_sum, b_sum, s, t, labels, weight, options, vocab_start=a,
                            grad_student=grad_s, grad_teacher=grad_t)
        grads_s.append(grad_s)
        grads_t.append(grad_t)
    grad_t = torch.cat(grads_t, dim=1) if case.get("mutual") else None
    return row_stats[:, ROW_LOSS], torch.cat(grads_s, dim=1), grad_t


SIM_CASES = {
    "uneven_T1": dict(seed=1, vocab=1001, sizes=[400, 101, 500], lead=(9,), alpha=0.3),
    "uneven_T2": dict(seed=2, vocab=1001, sizes=[334, 334, 333], lead=(3, 3), temperature=2.0),
    "no_labels": dict(seed=3, vocab=300, sizes=[100, 200], lead=(7,), labels=False,
                      temperature=1.5),
    "shift_1e4": dict(seed=4, vocab=700, sizes=[50, 650], lead=(8,), shift=1e4, temperature=2.0,
                      alpha=0.7),
    "masked": dict(seed=5, vocab=257, sizes=[100, 100, 57], lead=(8,), masked=True,
                   temperature=0.5),
    "mutual": dict(seed=6, vocab=513, sizes=[256, 257], lead=(7,), mutual=True, temperature=3.0),
    "out_of_range": dict(seed=7, vocab=200, sizes=[120, 80], lead=(7,), out_of_range=True),
    "five_shards_one_wide": dict(seed=8, vocab=130, sizes=[1, 40, 40, 40, 9], lead=(9,),
                                 temperature=1.3),
    "bf16": dict(seed=9, vocab=600, sizes=[300, 300], lead=(6,), dtype=torch.bfloat16,
                 temperature=2.0),
    "reverse_kl_smoothing": dict(seed=40, vocab=301, sizes=[100, 201], lead=(6,),
                                 divergence="reverse_kl", label_smoothing=0.1, temperature=2.0,
                                 mutual=True),
    "jsd_z_loss": dict(seed=41, vocab=257, sizes=[100, 100, 57], lead=(7,), divergence="jsd",
                       beta=0.3, z_loss=0.01, mutual=True, temperature=1.5),
    "tvd_shift": dict(seed=42, vocab=300, sizes=[150, 150], lead=(6,), divergence="tvd",
                      shift=1e4, alpha=0.6),
    "skew_kl_masked": dict(seed=43, vocab=257, sizes=[100, 100, 57], lead=(8,),
                           divergence="skew_kl", skew=0.2, masked=True, mutual=True),
    "skew_reverse_kl": dict(seed=44, vocab=200, sizes=[120, 80], lead=(6,),
                            divergence="skew_reverse_kl", temperature=2.0, label_smoothing=0.2),
}


@pytest.mark.parametrize("name", list(SIM_CASES))
def test_shard_steps_match_reference(name, backend):
    case = SIM_CASES[name]
    case = {**case, "reduction": "none"}  # unit weight: row losses and raw row gradients
    row_losses, grad_s, grad_t = simulate_shards(case, backend)
    ref_loss, ref_grad_s, ref_grad_t = reference_result(case, unit_upstream=True)
    low = case.get("dtype") == torch.bfloat16
    tol = dict(rtol=2e-2, atol=2e-2) if low else dict(rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(row_losses.double().cpu(), ref_loss.view(-1), equal_nan=True,
                               **tol)
    gtol = dict(rtol=2e-2, atol=1e-2) if low else dict(rtol=1e-4, atol=1e-6)
    # Out-of-range rows: the loss is NaN by design, their gradient is not specified.
    keep = ~ref_loss.view(-1).isnan()
    assert keep.sum() >= ref_loss.numel() - 1
    torch.testing.assert_close(grad_s.double().cpu().view(-1, case["vocab"])[keep],
                               ref_grad_s.view(-1, case["vocab"])[keep], **gtol)
    if case.get("mutual"):
        torch.testing.assert_close(grad_t.double().cpu(), ref_grad_t.view(-1, case["vocab"]),
                                   **gtol)
    if name == "masked":
        assert torch.isfinite(row_losses).all()
    if name == "out_of_range":
        assert row_losses.isnan().sum() == 1


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    cuts=st.lists(st.integers(1, 95), min_size=0, max_size=5, unique=True),
    temperature=st.sampled_from([0.5, 1.0, 3.0]),
    alpha=st.sampled_from([0.0, 0.4, 1.0]),
    seed=st.integers(0, 2**16),
    mask_shard=st.booleans(),
)
def test_any_split_of_the_vocabulary_gives_the_same_loss(monkeypatch, cuts, temperature, alpha,
                                                         seed, mask_shard):
    """Wherever the vocabulary is cut (shards of one column included, one fully masked shard
    per row optionally), the per-row losses and gradients are the unsplit ones."""
    monkeypatch.setenv("FASTKD_BACKEND", "torch")
    vocab = 96
    edges = [0, *sorted(cuts), vocab]
    sizes = [b - a for a, b in zip(edges[:-1], edges[1:], strict=True)]
    case = dict(seed=seed, vocab=vocab, sizes=sizes, lead=(len(sizes) + 4,),
                temperature=temperature, alpha=alpha, reduction="none")
    if mask_shard and len(sizes) > 1:  # (one shard masked whole would mask the whole row)
        case["masked"] = True
    row_losses, grad_s, _ = simulate_shards(case, "cpu")
    ref_loss, ref_grad_s, _ = reference_result(case, unit_upstream=True)
    torch.testing.assert_close(row_losses.double(), ref_loss.view(-1), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(grad_s.double(), ref_grad_s.view(-1, vocab), rtol=1e-4,
                               atol=1e-6)


PRECISION_CASES = {
    "shift_1e4": SIM_CASES["shift_1e4"],
    # Two blocks of 4096 in the first shard, the teacher 1e4 higher in part of the second.
    "teacher_step_1e4": dict(seed=42, vocab=4700, sizes=[4500, 200], lead=(4,),
                             temperature=2.0, teacher_step=(4096, 4600, 1e4)),
}


@pytest.mark.parametrize("name", list(PRECISION_CASES))
def test_large_offsets_keep_fp32_precision(backend, name):
    """Offsets of 1e4 must not cost precision in the shard statistics or their combination: the
    error against float64 stays at the single-device fused kernel's level."""
    case = {**PRECISION_CASES[name], "reduction": "none"}
    row_losses, grad_s, _ = simulate_shards(case, backend)
    exact, exact_grad, _ = reference_result(case, unit_upstream=True)
    # teacher_step_1e4 also sends the gradient kernel through more than one block per shard.
    torch.testing.assert_close(grad_s.double().cpu(), exact_grad.view(grad_s.shape), rtol=1e-4,
                               atol=1e-6)
    student, teacher, labels, _ = make_inputs(case)
    fused = fastkd.kd_loss(student.to(backend), teacher.to(backend), labels.to(backend),
                           **loss_options(case))
    err_sharded = (row_losses.double().cpu() - exact).abs().max().item()
    err_fused = (fused.double().cpu() - exact).abs().max().item()
    assert err_sharded < 2e-5, err_sharded
    assert err_sharded <= 4 * err_fused + 2e-6, (err_sharded, err_fused)


# ---------------------------------------------------------------------------------------------
# Layers 2 and 3: real process groups. One spawn per world size runs all of its cases.

# Worker-side names of the collective cases; sizes is the per-rank split of the vocabulary.
GROUP_CASES = {
    2: {
        "mean_T2": dict(seed=11, vocab=301, sizes=[150, 151], lead=(2, 5), temperature=2.0,
                        alpha=0.4),
        "sum_no_start": dict(seed=12, vocab=64, sizes=[40, 24], lead=(6,), reduction="sum",
                             pass_start=False),
        "triton_mean_inplace": dict(seed=13, vocab=301, sizes=[101, 200], lead=(2, 4),
                                    temperature=2.0, backend="triton", inplace=True),
        "triton_none_mutual": dict(seed=14, vocab=130, sizes=[65, 65], lead=(7,),
                                   reduction="none", mutual=True, backend="triton",
                                   masked=True),
        "triton_batchmean_T1": dict(seed=15, vocab=200, sizes=[150, 50], lead=(2, 3),
                                    reduction="batchmean", alpha=0.8, backend="triton"),
        **{f"{divergence}_{backend}": dict(
            seed=50 + i, vocab=131, sizes=[64, 67], lead=(6,), divergence=divergence, beta=0.3,
            skew=0.2, temperature=2.0, label_smoothing=0.1, z_loss=0.01, mutual=True,
            backend=backend)
           for i, (divergence, backend) in enumerate(
               (d, b) for d in fastkd.DIVERGENCES[1:] for b in ("torch", "triton"))},
    },
    3: {
        "v1001_mean_T2": dict(seed=21, vocab=1001, sizes=[334, 334, 333], lead=(2, 4),
                              temperature=2.0, alpha=0.3),
        "v1001_sum": dict(seed=22, vocab=1001, sizes=[500, 1, 500], lead=(7,), reduction="sum",
                          temperature=0.7),
        "v1001_batchmean_inplace": dict(seed=23, vocab=1001, sizes=[300, 400, 301],
                                        lead=(3, 3), reduction="batchmean", inplace=True),
        "sum_normalizer": dict(seed=30, vocab=200, sizes=[70, 60, 70], lead=(7,),
                               reduction="sum", normalizer=7.5, temperature=2.0),
        "v1001_none": dict(seed=24, vocab=1001, sizes=[334, 334, 333], lead=(8,),
                           reduction="none", temperature=4.0, out_of_range=True),
        "no_labels_no_start": dict(seed=25, vocab=99, sizes=[33, 33, 33], lead=(6,),
                                   labels=False, temperature=2.0, pass_start=False),
        "shift_mutual": dict(seed=26, vocab=500, sizes=[100, 300, 100], lead=(7,), shift=1e4,
                             mutual=True, temperature=2.0),
        "all_ignored": dict(seed=27, vocab=90, sizes=[30, 30, 30], lead=(6,), all_ignored=True),
        "subgroup_1_2": dict(seed=28, vocab=101, sizes=[50, 51], lead=(6,), subgroup=[1, 2],
                             temperature=2.0, pass_start=False),
        "triton_v1001": dict(seed=29, vocab=1001, sizes=[334, 334, 333], lead=(7,),
                             temperature=2.0, alpha=0.6, backend="triton"),
        **{f"{divergence}_{backend}": dict(
            seed=70 + i, vocab=101, sizes=[30, 40, 31], lead=(5,), divergence=divergence,
            beta=0.7, skew=0.1, temperature=1.0, alpha=0.6, backend=backend)
           for i, (divergence, backend) in enumerate(
               (d, b) for d in fastkd.DIVERGENCES[1:] for b in ("torch", "triton"))},
    },
}


def run_vocab_parallel_case(case: dict, group, group_rank: int) -> dict:
    student, teacher, labels, grad_output = make_inputs(case)
    if case.get("all_ignored"):
        labels.fill_(IGNORE)
    start, stop = shard_bounds(case["vocab"], case["sizes"])[group_rank]
    student_shard = student[..., start:stop].clone().requires_grad_()
    teacher_shard = teacher[..., start:stop].clone().requires_grad_(bool(case.get("mutual")))
    os.environ["FASTKD_BACKEND"] = case.get("backend", "torch")
    loss = fkd_dist.kd_loss(
        student_shard, teacher_shard, labels, group=group, **loss_options(case),
        vocab_start_index=start if case.get("pass_start", True) else None,
        inplace_backward=case.get("inplace", False),
    )
    loss.backward(torch.where(loss.isnan(), 0.0, grad_output.float()) if loss.dim() else None)
    return {
        "loss": loss.detach(),
        "grad_s": student_shard.grad,
        "grad_t": teacher_shard.grad,
    }


# The data-parallel model: embedding + LM head; the teacher is a fixed, different model.
DDP_VOCAB, DDP_HIDDEN, DDP_SHAPE = 48, 16, (2, 5)


def make_lm(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(DDP_VOCAB, DDP_HIDDEN),
                               torch.nn.Linear(DDP_HIDDEN, DDP_VOCAB))


def ddp_micro_batches(rank: int):
    """Token ids and labels of one rank's micro-batches; ignored counts differ per rank and
    micro-batch (rank 0: 1 and 6 ignored, rank 1: 0 and 8), so per-call means weigh unevenly."""
    gen = torch.Generator().manual_seed(100 + rank)
    ignored = {0: (1, 6), 1: (0, 8)}[rank]
    batches = []
    for n_ignored in ignored:
        tokens = torch.randint(0, DDP_VOCAB, DDP_SHAPE, generator=gen)
        labels = torch.randint(0, DDP_VOCAB, DDP_SHAPE, generator=gen)
        labels.view(-1)[:n_ignored] = IGNORE
        batches.append((tokens, labels))
    return batches


# The recipe (normalizer) with both backends, its explicit-division form, and the naive
# per-call mean once, to show that it differs.
DDP_RUNS = [("torch", "normalizer"), ("triton", "normalizer"), ("torch", "divide"),
            ("torch", "naive_mean")]


def run_ddp(rank: int, world_size: int, backend: str, recipe: str) -> dict:
    """One optimizer step's gradients, accumulated over micro-batches under DDP."""
    os.environ["FASTKD_BACKEND"] = backend
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(make_lm(seed=0))
    teacher = make_lm(seed=1).requires_grad_(False)
    batches = ddp_micro_batches(rank)
    options = dict(temperature=2.0, alpha=0.5, ignore_index=IGNORE)
    n_tokens = fkd_dist.global_token_count([y for _, y in batches], IGNORE)
    for i, (tokens, labels) in enumerate(batches):
        # DDP all-reduces the gradients at the last micro-batch only.
        last = i + 1 == len(batches)
        with contextlib.nullcontext() if last else model.no_sync():
            student_logits, teacher_logits = model(tokens), teacher(tokens)
            if recipe == "normalizer":  # DDP averages over ranks: n_tokens / world_size
                criterion = fastkd.KDLoss(reduction="sum", **options)
                loss = criterion(student_logits, teacher_logits, labels,
                                 normalizer=n_tokens.clamp(min=1) / world_size)
            elif recipe == "divide":
                criterion = fastkd.KDLoss(reduction="sum", **options)
                loss = criterion(student_logits, teacher_logits, labels)
                loss = loss * world_size / n_tokens.clamp(min=1)
            else:  # naive: the per-call mean, averaged over micro-batches
                criterion = fastkd.KDLoss(reduction="mean", **options)
                loss = criterion(student_logits, teacher_logits, labels) / len(batches)
            loss.backward()
    return {name: p.grad.clone() for name, p in model.module.named_parameters()}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # the workers share the machine's cores
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
        )
        results = {}
        for name, case in GROUP_CASES[world_size].items():
            members = case.get("subgroup", list(range(world_size)))
            # new_group is collective over the whole world, members or not.
            group = dist.new_group(members) if "subgroup" in case else None
            if rank in members:
                results[name] = run_vocab_parallel_case(case, group, members.index(rank))
        if world_size == 2:
            for backend, recipe in DDP_RUNS:
                results[f"ddp_{backend}_{recipe}"] = run_ddp(rank, world_size, backend, recipe)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_group(world_size: int, tmp_dir) -> list[dict]:
    """Spawn `world_size` gloo workers (file rendezvous: no port to pick or collide on), wait
    at most GROUP_TIMEOUT_S, and return every rank's results."""
    init_file = str(tmp_dir / "rendezvous")
    # Workers run the Triton cases in the interpreter on CPU tensors, also on a GPU host. The
    # children copy the environment when they start; this process keeps its own setting.
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        context = mp.start_processes(_worker, args=(world_size, init_file, str(tmp_dir)),
                                     nprocs=world_size, join=False, start_method="spawn")
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world_size}-process group did not finish in time")
    except Exception as exc:
        for process in context.processes:
            if process.is_alive():
                process.kill()
        errors = sorted(tmp_dir.glob("rank*.err"))
        raise AssertionError("".join(p.read_text() for p in errors) or str(exc)) from exc
    return [torch.load(tmp_dir / f"rank{r}.pt") for r in range(world_size)]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    results = {}

    def get(world_size: int):
        if world_size not in results:
            results[world_size] = run_group(world_size, tmp_path_factory.mktemp(f"w{world_size}"))
        return results[world_size]

    return get


@pytest.mark.parametrize(
    "world_size,name",
    [(w, name) for w, cases in GROUP_CASES.items() for name in cases],
)
def test_vocab_parallel_matches_single_process(group_results, world_size, name):
    case = GROUP_CASES[world_size][name]
    per_rank = group_results(world_size)
    members = case.get("subgroup", list(range(world_size)))
    outputs = [per_rank[r][name] for r in members]
    if case.get("all_ignored"):
        # Every row ignored: the mean is 0 (not 0/0) and the gradient 0.
        student = make_inputs(case)[0]
        ref_loss = torch.zeros((), dtype=torch.float64)
        ref_grad_s = torch.zeros_like(student, dtype=torch.float64)
        ref_grad_t = None
    else:
        ref_loss, ref_grad_s, ref_grad_t = reference_result(case)
    # Every rank returns the same global loss, bit for bit.
    for out in outputs[1:]:
        torch.testing.assert_close(out["loss"], outputs[0]["loss"], rtol=0, atol=0,
                                   equal_nan=True)
    torch.testing.assert_close(outputs[0]["loss"].double(), ref_loss, rtol=1e-5, atol=1e-5,
                               equal_nan=True)
    grad_s = torch.cat([out["grad_s"] for out in outputs], dim=-1).double()
    keep = ~ref_loss.isnan() if ref_loss.dim() else torch.ones((), dtype=torch.bool)
    torch.testing.assert_close(grad_s[keep], ref_grad_s[keep], rtol=1e-4, atol=1e-6)
    if case.get("mutual"):
        grad_t = torch.cat([out["grad_t"] for out in outputs], dim=-1).double()
        torch.testing.assert_close(grad_t, ref_grad_t, rtol=1e-4, atol=1e-6)
    else:
        assert all(out["grad_t"] is None for out in outputs)


def single_process_grads(backend: str, monkeypatch) -> dict:
    """Gradients of reduction="mean" over the concatenated batch of every rank."""
    monkeypatch.setenv("FASTKD_BACKEND", backend)
    model = make_lm(seed=0)
    teacher = make_lm(seed=1).requires_grad_(False)
    batches = [b for rank in (0, 1) for b in ddp_micro_batches(rank)]
    tokens = torch.cat([t for t, _ in batches])
    labels = torch.cat([y for _, y in batches])
    criterion = fastkd.KDLoss(temperature=2.0, alpha=0.5, ignore_index=IGNORE, reduction="mean")
    criterion(model(tokens), teacher(tokens), labels).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend,recipe", [run for run in DDP_RUNS if run[1] != "naive_mean"])
def test_ddp_global_token_count_recipe_matches_single_process(group_results, backend, recipe,
                                                              monkeypatch):
    per_rank = group_results(2)
    expected = single_process_grads(backend, monkeypatch)
    for rank in (0, 1):
        grads = per_rank[rank][f"ddp_{backend}_{recipe}"]
        for name, grad in expected.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7)
        if recipe == "normalizer" and backend == "torch":
            naive = per_rank[rank]["ddp_torch_naive_mean"]
            # The per-call mean over uneven token counts really is a different gradient here,
            # so the recipe above is what makes the test pass.
            gap = max((naive[n] - g).abs().max().item() for n, g in expected.items())
            scale = max(g.abs().max().item() for g in expected.values())
            assert gap > 1e-2 * scale, (gap, scale)


# ---------------------------------------------------------------------------------------------
# The kernels as the GPU compiler sees them (the interpreter accepts more than it does).


def compile_for_sm90(kernel, dtype: str, constexprs: dict, num_warps: int):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fixed_pointers = {"stats_ptr": "*fp32", "labels_ptr": "*i64", "weight_ptr": "*fp32",
                      "state_ptr": "*fp32", "sums_ptr": "*fp32", "row_stats_ptr": "*fp32"}
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs or name.isupper():
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = fixed_pointers.get(name, "*" + dtype)
        elif name.endswith("_stride"):
            signature[name] = "i64"
        elif name in ("temperature", "alpha", "lam", "label_smoothing", "z_loss"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    # Unit column strides, as the launchers usually pass: the vectorised build.
    constexprs = {**constexprs, **{n: 1 for n in kernel.arg_names if n.endswith("col_stride")}}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps})


STATIC_BUILDS = [(which, dtype) for which in ("stats", "grad", "grad_mutual")
                 for dtype in ("bf16", "fp32")]


def static_resource_usage() -> dict:
    """cuobjdump's resource line of every STATIC_BUILDS kernel compiled for sm_90a. Runs in a
    process without TRITON_INTERPRET, where @triton.jit gives compilable kernels."""
    import triton

    from fastkd.kernels import kd_vocab_parallel as kernels

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    config = kernels.sweep_config(1 << 20)  # a wide shard: the full loop block
    block, warps = dict(BLOCK_V=config["BLOCK_V"]), config["num_warps"]
    usage = {}
    for which, dtype in STATIC_BUILDS:
        flags = dict(DIVERGENCE=0, HAS_LABELS=True, T_IS_ONE=False, SMOOTHING=False, **block)
        if which == "stats":
            compiled = compile_for_sm90(kernels._vp_stats_kernel, dtype, flags, warps)
        else:
            compiled = compile_for_sm90(
                kernels._vp_rows_kernel, dtype,
                dict(SUMS=False, STUDENT_GRAD=True, TEACHER_GRAD=which == "grad_mutual",
                     **flags), warps,
            )
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(compiled.asm["cubin"])
            cubin.flush()
            usage[f"{which}-{dtype}"] = subprocess.run(
                [cuobjdump, "--dump-resource-usage", cubin.name],
                capture_output=True, text=True, check=True,
            ).stdout
    return usage


@pytest.fixture(scope="module")
def fresh_process():
    """Facts from one new Python process (saves a second interpreter start): whether
    `import fastkd` loads fastkd.distributed, and the static builds' resource usage (None
    without triton's NVIDIA tools)."""
    code = (
        "import json, os, sys, triton, fastkd\n"
        "facts = {'distributed_loaded': 'fastkd.distributed' in sys.modules, 'usage': None}\n"
        "bin_dir = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin')\n"
        "if os.path.exists(os.path.join(bin_dir, 'cuobjdump')):\n"
        "    sys.path.insert(0, sys.argv[1])\n"
        "    import test_distributed\n"
        "    facts['usage'] = test_distributed.static_resource_usage()\n"
        "print(json.dumps(facts))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=GROUP_TIMEOUT_S)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_fastkd_does_not_load_distributed(fresh_process):
    assert fresh_process["distributed_loaded"] is False


@pytest.mark.parametrize("which,dtype", STATIC_BUILDS)
def test_kernels_compile_for_sm90_without_spills(fresh_process, which, dtype):
    if fresh_process["usage"] is None:
        pytest.skip("triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
    usage = fresh_process["usage"][f"{which}-{dtype}"]
    assert "REG:" in usage, usage
    assert "STACK:0 " in usage and "LOCAL:0 " in usage, usage


# ---------------------------------------------------------------------------------------------
# In-process checks of the public API's edges.


def test_kd_loss_without_process_group_says_so():
    assert not dist.is_initialized()
    s = torch.randn(2, 5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        fkd_dist.kd_loss(s, s, torch.tensor([0, 1]))


@pytest.fixture
def world_of_one(tmp_path):
    # On a GPU host the Triton backend's tensors live on CUDA, which NCCL serves.
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp_path / 'rendezvous'}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_world_of_one_equals_fastkd_kd_loss(world_of_one, backend, dtype):
    """With one shard the vocab-parallel loss is fastkd.kd_loss: value, dtype and gradient."""
    gen = torch.Generator().manual_seed(31)
    s = torch.randn(3, 4, 70, generator=gen, dtype=dtype).to(backend)
    t = torch.randn(3, 4, 70, generator=gen, dtype=dtype).to(backend)
    y = torch.randint(0, 70, (3, 4), generator=gen).to(backend)
    y[0, 0] = IGNORE
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = fkd_dist.kd_loss(s1, t, y, temperature=2.0, alpha=0.3)
    expected = fastkd.kd_loss(s2, t, y, temperature=2.0, alpha=0.3)
    assert loss.dtype == expected.dtype
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    (loss * 3).backward()
    (expected * 3).backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean", "none"])
def test_no_rows(world_of_one, backend, reduction):
    s = torch.randn(0, 9, device=backend, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long, device=backend)
    loss = fkd_dist.kd_loss(s, torch.randn(0, 9, device=backend), labels, reduction=reduction)
    loss.sum().backward()
    assert loss.numel() == (0 if reduction == "none" else 1) and (loss == 0).all()
    assert s.grad.shape == (0, 9)


def test_inplace_backward_overwrites_the_shard_with_its_gradient(world_of_one, backend):
    gen = torch.Generator().manual_seed(32)
    s = torch.randn(2, 3, 50, generator=gen).to(backend)
    t = torch.randn(2, 3, 50, generator=gen).to(backend)
    y = torch.randint(0, 50, (2, 3), generator=gen).to(backend)
    expected = s.clone().requires_grad_()
    fastkd.kd_loss(expected, t, y, temperature=2.0).backward()
    shard = s.clone().requires_grad_()
    storage = shard.untyped_storage().data_ptr()
    fkd_dist.kd_loss(shard, t, y, temperature=2.0, inplace_backward=True).backward()
    torch.testing.assert_close(shard.grad, expected.grad, rtol=1e-5, atol=1e-7)
    assert shard.grad.untyped_storage().data_ptr() == storage  # no N x V buffer of its own
    torch.testing.assert_close(shard.detach(), expected.grad, rtol=1e-5, atol=1e-7)


def test_backward_twice_raises(world_of_one):
    s = torch.randn(4, 10, requires_grad=True)
    loss = fkd_dist.kd_loss(s, torch.randn(4, 10), torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="only once"):
        loss.backward()


@pytest.mark.parametrize("start,error", [(-1, ValueError), (1.0, TypeError), (True, TypeError)])
def test_bad_vocab_start_index(world_of_one, start, error):
    s = torch.randn(2, 5)
    with pytest.raises(error, match="vocab_start_index"):
        fkd_dist.kd_loss(s, s, torch.tensor([0, 1]), vocab_start_index=start)


def test_global_token_count(world_of_one):
    a = torch.tensor([[1, IGNORE, 3], [IGNORE, IGNORE, 0]])
    b = torch.tensor([5, 6])
    assert fkd_dist.global_token_count(a, IGNORE).item() == 3
    assert fkd_dist.global_token_count([a, b], IGNORE).item() == 5
    assert fkd_dist.global_token_count(a, ignore_index=0).dtype == torch.int64
