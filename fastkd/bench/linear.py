"""Fused-linear KD benchmark: hidden states and lm_head weights -> loss, forward + backward.

    fastkd-bench --linear                              # CPU: N=2048, H=512, V=32000 fp32
    fastkd-bench --linear --linear-shapes linear-gpu   # the GPU grid (bf16)

Providers, on the same inputs (student hidden and weight require grad, the teacher is frozen):
- fastkd_linear: fastkd.linear_kd_loss (chunked, gradients in the forward);
- explicit: full logits for both models, then fastkd.kd_loss;
- eager: full logits, then fastkd.reference.kd_loss (autograd);
- trl: TRL's _chunked_divergence_loss (divergence only: no CE term, no T^2);
- liger: Liger's LigerFusedLinearJSDLoss (weight_hard = 1 - alpha, weight_soft = alpha T^2);
- gemms: the four GEMMs alone (both projections, dH = G W, dW = G^T H) at full size: the floor.

Each provider runs in its own process on CPU, so its peak RSS above the inputs is its own; on GPU
peak memory is torch.cuda.max_memory_allocated above the inputs. Time is the median of a few
full-size runs after a warm-up on a few rows (CPU) or triton's do_bench (GPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cases import ALPHA, DTYPES, IGNORE_INDEX, IGNORED_FRACTION, LOGIT_STD, TEMPERATURE
from .measure import RssPeak, Settings, _cpu_median_ms, _gpu_median_ms

# The divergence every provider computes: the generalised JSD at beta = 0.5 (TRL, Liger).
DIVERGENCE, BETA = "jsd", 0.5
MIB = 1 << 20


@dataclass(frozen=True)
class LinearCase:
    n_rows: int
    hidden: int
    vocab: int
    dtype: str

    @property
    def name(self) -> str:
        return f"N{self.n_rows}-H{self.hidden}-V{self.vocab}-{self.dtype}"


SHAPE_SETS = {
    "linear-cpu": [LinearCase(2048, 512, 32000, "fp32")],
    "linear-gpu": [LinearCase(n, 4096, v, "bf16") for n in (4096, 16384)
                   for v in (32000, 128256, 151936)],
    "linear-gpu-quick": [LinearCase(8192, 4096, v, "bf16") for v in (32000, 151936)],
    "linear-tiny": [LinearCase(64, 32, 1000, "fp32")],
}


def make_inputs(case: LinearCase, device: str, seed: int = 0, rows: int | None = None):
    """(student hidden, student weight, teacher hidden, teacher weight, labels).

    Logits come out with a standard deviation of about LOGIT_STD; the teacher's hidden states are
    a noisy copy of the student's, so the two distributions are close but not equal.
    """
    n_rows = case.n_rows if rows is None else rows
    dtype = DTYPES[case.dtype]
    gen = torch.Generator(device=device).manual_seed(seed)
    scale = LOGIT_STD / math.sqrt(case.hidden)
    h_s = torch.randn(n_rows, case.hidden, generator=gen, device=device, dtype=dtype)
    w_s = torch.randn(case.vocab, case.hidden, generator=gen, device=device, dtype=dtype)
    w_s.mul_(scale)
    h_t = torch.randn(n_rows, case.hidden, generator=gen, device=device, dtype=dtype)
    h_t.mul_(0.5).add_(h_s)
    w_t = torch.randn(case.vocab, case.hidden, generator=gen, device=device, dtype=dtype)
    w_t.mul_(0.5 * scale).add_(w_s)
    label_gen = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(0, case.vocab, (n_rows,), generator=label_gen)
    labels.masked_fill_(torch.rand(n_rows, generator=label_gen) < IGNORED_FRACTION, IGNORE_INDEX)
    h_s.requires_grad_()
    w_s.requires_grad_()
    return h_s, w_s, h_t, w_t, labels.to(device)


# ---------------------------------------------------------------------------------------------
# Providers: fn(h_s, w_s, h_t, w_t, labels) -> scalar loss


def _fastkd_linear():
    from ..linear import linear_kd_loss

    def fn(h_s, w_s, h_t, w_t, labels):
        return linear_kd_loss(h_s, w_s, h_t, w_t, labels, temperature=TEMPERATURE, alpha=ALPHA,
                              ignore_index=IGNORE_INDEX, **_divergence_kwargs())
    return fn


def _explicit():
    from ..functional import kd_loss

    def fn(h_s, w_s, h_t, w_t, labels):
        with torch.no_grad():
            z_t = h_t @ w_t.T
        return kd_loss(h_s @ w_s.T, z_t, labels, temperature=TEMPERATURE, alpha=ALPHA,
                       ignore_index=IGNORE_INDEX, **_divergence_kwargs())
    return fn


def _eager():
    from .. import reference

    def fn(h_s, w_s, h_t, w_t, labels):
        with torch.no_grad():
            z_t = h_t @ w_t.T
        return reference.kd_loss(h_s @ w_s.T, z_t, labels, temperature=TEMPERATURE, alpha=ALPHA,
                                 ignore_index=IGNORE_INDEX, **_divergence_kwargs())
    return fn


def _trl():
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(DIVERGENCE, BETA)

    def fn(h_s, w_s, h_t, w_t, labels):
        loss, _, _ = _chunked_divergence_loss(h_s, h_t, w_s, w_t, labels != IGNORE_INDEX, beta,
                                              temperature=TEMPERATURE)
        return loss
    return fn


def _liger():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    beta = {"forward_kl": 0.0, "reverse_kl": 1.0}.get(DIVERGENCE, BETA)
    loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=1.0 - ALPHA,
                                      weight_soft_loss=ALPHA * TEMPERATURE**2, beta=beta,
                                      ignore_index=IGNORE_INDEX, temperature=TEMPERATURE,
                                      compiled=torch.cuda.is_available())

    def fn(h_s, w_s, h_t, w_t, labels):
        return loss_fn(h_s, w_s, h_t, w_t, labels)
    return fn


class _GemmFloor(torch.autograd.Function):
    """The four GEMMs of a fused-linear step and nothing else (the gradient is the logits)."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t):
        z_s = h_s @ w_s.T
        z_t = h_t @ w_t.T
        ctx.save_for_backward(z_s, h_s, w_s)
        return z_s[:1, :1].sum() + z_t[:1, :1].sum()

    @staticmethod
    def backward(ctx, grad_output):
        g, h_s, w_s = ctx.saved_tensors
        return g @ w_s, g.T @ h_s, None, None


def _gemms():
    def fn(h_s, w_s, h_t, w_t, labels):
        return _GemmFloor.apply(h_s, w_s, h_t, w_t)
    return fn


def _divergence_kwargs() -> dict:
    if DIVERGENCE == "forward_kl":
        return {}
    return {"divergence": DIVERGENCE, "beta": BETA}


def _installed(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return f"not installed (pip install {module.replace('_', '-')})"
    return None


PROVIDERS = {
    "fastkd_linear": (_fastkd_linear, "fastkd.linear_kd_loss", lambda: None),
    "explicit": (_explicit, "full logits + fastkd.kd_loss", lambda: None),
    "eager": (_eager, "full logits + fastkd.reference.kd_loss", lambda: None),
    "trl": (_trl, "TRL _chunked_divergence_loss (no CE term)", lambda: _installed("trl")),
    "liger": (_liger, "Liger LigerFusedLinearJSDLoss", lambda: _installed("liger_kernel")),
    "gemms": (_gemms, "the 4 GEMMs alone (floor)", lambda: None),
}


# ---------------------------------------------------------------------------------------------
# Measuring


def float64_loss(case: LinearCase, device: str, seed: int) -> float:
    """The loss of fastkd's definition in float64, chunked over rows (the accuracy reference)."""
    from .. import reference

    h_s, w_s, h_t, w_t, labels = make_inputs(case, device, seed)
    w_s64, w_t64 = w_s.detach().double(), w_t.double()
    total, chunk = 0.0, max(1, (1 << 23) // case.vocab)
    with torch.no_grad():
        for start in range(0, case.n_rows, chunk):
            rows = slice(start, start + chunk)
            total += float(reference.kd_loss(
                h_s[rows].detach().double() @ w_s64.T, h_t[rows].double() @ w_t64.T,
                labels[rows], temperature=TEMPERATURE, alpha=ALPHA, ignore_index=IGNORE_INDEX,
                reduction="sum", **_divergence_kwargs()))
    return total / max(int((labels != IGNORE_INDEX).sum()), 1)


def measure(case: LinearCase, provider: str, settings: Settings,
            reference_loss: float | None) -> dict:
    build, description, skip = PROVIDERS[provider]
    record = {"case": case.name, **asdict(case), "provider": provider,
              "description": description, "status": "ok", "reason": skip()}
    if record["reason"] is not None:
        record["status"] = "skipped"
        return record
    try:
        _measure_into(record, case, build(), settings, reference_loss)
    except Exception as exc:  # noqa: BLE001 - the report says which provider failed and why
        out_of_memory = isinstance(exc, torch.OutOfMemoryError)
        record.update(status="oom" if out_of_memory else "error",
                      reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    return record


def _measure_into(record, case, fn, settings, reference_loss):
    device = settings.device
    inputs = make_inputs(case, device, settings.seed)
    h_s, w_s = inputs[0], inputs[1]

    def step():
        loss = fn(*inputs)
        loss.backward()
        return loss

    def reset():
        h_s.grad = w_s.grad = None

    if device == "cuda":
        loss = step()
        reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        record["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - before
        reset()
        record["time_ms"] = _gpu_median_ms(step, [h_s, w_s], settings)
        record["reps"] = None
    else:
        warm = make_inputs(case, device, settings.seed, rows=8)
        fn(*warm).backward()
        del warm
        with RssPeak() as peak:
            start = time.perf_counter()
            loss = step()
            first_ms = (time.perf_counter() - start) * 1e3
        record["peak_mem_bytes"] = peak.peak_bytes
        reset()
        record["time_ms"], record["reps"] = _cpu_median_ms(
            step, reset, settings.cpu_reps - 1, settings.cpu_budget_s - first_ms * 1e-3,
            [first_ms])
    record["loss"] = float(loss.detach())
    # Other processes on the machine skew CPU timings: say how busy it was.
    record["load_average_1min"] = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") \
        else None
    if reference_loss is not None and record["provider"] not in ("trl", "gemms"):
        record["loss_rel_err"] = abs(record["loss"] - reference_loss) / abs(reference_loss)
    record["logits_bytes"] = case.n_rows * case.vocab * torch.empty(
        (), dtype=DTYPES[case.dtype]).element_size()


def _worker(request_path: str) -> int:
    request = json.loads(Path(request_path).read_text())
    settings = Settings(**request["settings"])
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    for fields in request["cases"]:
        case = LinearCase(**fields)
        record = measure(case, request["provider"], settings,
                         request["reference_losses"].get(case.name))
        print(json.dumps(record), flush=True)
    return 0


def run_suite(cases, providers, settings: Settings, *, isolate: bool, on_result=None,
              references: dict | None = None):
    """Records of every provider on every case; `references` caches the float64 losses by case
    name (filled in here for the cases it lacks)."""
    references = {} if references is None else references
    for case in cases:
        if case.name not in references:
            references[case.name] = float64_loss(case, settings.device, settings.seed)
    records = []

    def emit(record):
        records.append(record)
        if on_result is not None:
            on_result(record)

    for provider in providers:
        if not isolate:
            for case in cases:
                emit(measure(case, provider, settings, references[case.name]))
            continue
        import tempfile

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as request:
            json.dump({"provider": provider, "cases": [asdict(c) for c in cases],
                       "settings": asdict(settings), "reference_losses": references}, request)
        result = subprocess.run([sys.executable, "-m", "fastkd.bench.linear", "--worker",
                                 request.name], capture_output=True, text=True)
        Path(request.name).unlink()
        lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
        for line in lines:
            emit(json.loads(line))
        if len(lines) < len(cases):
            tail = " | ".join(result.stderr.strip().splitlines()[-3:])[-400:]
            for case in cases[len(lines):]:
                emit({"case": case.name, **asdict(case), "provider": provider,
                      "status": "error", "reason": f"worker exited {result.returncode}: {tail}"})
    return records


def results_table(records) -> str:
    """Markdown: time, peak extra memory and the ratios the targets are stated in."""
    lines = ["| case | provider | time (ms) | peak extra (MiB) | time / explicit | "
             "memory / explicit | time / 4 GEMMs | loss rel. err | note |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    by_case = {}
    for record in records:
        by_case.setdefault(record["case"], {})[record["provider"]] = record
    for case, row in by_case.items():
        explicit, floor = row.get("explicit"), row.get("gemms")
        for provider, r in row.items():
            if r["status"] != "ok":
                lines.append(f"| {case} | {provider} | - | - | - | - | - | - | "
                             f"{r['status']}: {r['reason']} |")
                continue

            def ratio(other, key, r=r):
                if other is None or other.get("status") != "ok" or not other.get(key):
                    return "-"
                return f"{r[key] / other[key]:.2f}"

            mem = r.get("peak_mem_bytes")
            err = r.get("loss_rel_err")
            lines.append(
                f"| {case} | {provider} | {r['time_ms']:.1f} | "
                f"{'-' if mem is None else f'{mem / MIB:.0f}'} | {ratio(explicit, 'time_ms')} | "
                f"{ratio(explicit, 'peak_mem_bytes')} | {ratio(floor, 'time_ms')} | "
                f"{'-' if err is None else f'{err:.1e}'} | {r.get('reason') or ''} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fused-linear benchmark")
    group.add_argument("--linear", action="store_true",
                       help="benchmark the fused-linear loss (hidden states x lm_head) against "
                            "explicit logits, the eager reference, TRL, Liger and the 4 GEMMs")
    group.add_argument("--linear-providers", nargs="+", choices=sorted(PROVIDERS),
                       help="default: all of them")
    group.add_argument("--linear-shapes", choices=sorted(SHAPE_SETS),
                       help="default: linear-gpu on CUDA, linear-cpu otherwise")


def run_from_cli(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = args.linear_shapes or ("linear-gpu" if device == "cuda" else "linear-cpu")
    cases = SHAPE_SETS[shapes]
    providers = args.linear_providers or list(PROVIDERS)
    settings = Settings(device=device, seed=args.seed, gpu_rep_ms=args.gpu_rep_ms,
                        cpu_reps=args.cpu_reps, cpu_threads=args.cpu_threads)
    if settings.cpu_threads:
        torch.set_num_threads(settings.cpu_threads)
    from .cases import device_slug

    out_dir = args.out_dir / device_slug(device)
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_result(record):
        if record["status"] == "ok":
            mem = record.get("peak_mem_bytes")
            print(f"{record['case']:<28} {record['provider']:<14} {record['time_ms']:>10.1f} ms "
                  f"{'-' if mem is None else round(mem / MIB)} MiB", file=sys.stderr, flush=True)
        else:
            print(f"{record['case']:<28} {record['provider']:<14} {record['status']}: "
                  f"{record['reason']}", file=sys.stderr, flush=True)

    # Runs with different --linear-providers add up: the float64 references and the records of
    # other providers are kept (a provider's new record replaces its old one).
    reference_path = out_dir / f"linear_reference_seed{args.seed}.json"
    references = json.loads(reference_path.read_text()) if reference_path.exists() else {}
    for case in cases:
        if case.name not in references:
            references[case.name] = float64_loss(case, settings.device, settings.seed)
            reference_path.write_text(json.dumps(references))
    new = run_suite(cases, providers, settings, isolate=device == "cpu" and not args.no_isolate,
                    on_result=on_result, references=references)
    results_path = out_dir / "linear_results.json"
    old = json.loads(results_path.read_text())["records"] if results_path.exists() else []
    replaced = {(r["case"], r["provider"]) for r in new}
    records = [r for r in old if (r["case"], r["provider"]) not in replaced] + new
    meta = {"device": device, "shapes": shapes, "temperature": TEMPERATURE, "alpha": ALPHA,
            "divergence": DIVERGENCE, "beta": BETA, "ignored_fraction": IGNORED_FRACTION,
            "torch_threads": settings.cpu_threads or torch.get_num_threads()}
    results_path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    table = results_table(records)
    (out_dir / "linear_results.md").write_text(
        f"# fastkd fused-linear benchmark ({device})\n\n{json.dumps(meta)}\n\n{table}\n")
    print(table)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(_worker(sys.argv[2]))
    print("run `fastkd-bench --linear`", file=sys.stderr)
    sys.exit(2)
