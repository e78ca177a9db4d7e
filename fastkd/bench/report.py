"""Results on disk: JSON, a markdown table with the targets, and PNG plots against V."""

from __future__ import annotations

import json
from pathlib import Path

MIB = 1 << 20

# The project's performance targets, checked by the report.
GPU_COPY_FRACTION_TARGET = 0.85  # fastkd fwd+bwd, bf16, V >= 32k
GPU_MIN_VOCAB_FOR_BANDWIDTH = 32000
SPEEDUP_TARGET = 1.5  # fastkd vs the fastest other provider, GPU
# Extra memory: one gradient buffer, plus 1 MiB for the per-row losses and reduction scalars.
GRAD_BUFFER_SLACK_BYTES = MIB
# "~0 with inplace_backward": at most 1% of a gradient buffer.
INPLACE_MEMORY_FRACTION = 0.01
CPU_MEMORY_FRACTION_TARGET = 0.30  # torch backend peak vs eager reference peak
BASELINES = ("eager", "compile", "liger")


def _by(records, **match):
    return [r for r in records if all(r.get(k) == v for k, v in match.items())]


def _ok(record) -> bool:
    return record is not None and record.get("status") == "ok"


def _one(records, **match):
    found = _by(records, **match)
    return found[0] if found else None


def _cases(records):
    seen = {}
    for r in records:
        seen.setdefault(r["case"], r)
    return sorted(seen.values(), key=lambda r: (r["dtype"], r["mode"], r["n_rows"], r["vocab"]))


def evaluate_targets(records: list[dict], device: str) -> list[dict]:
    """One row per (target, case): what was required, what was achieved, and whether it passed."""
    rows = []

    def add(target, case, achieved, required, passed, note=""):
        rows.append({"target": target, "case": case, "achieved": achieved, "required": required,
                     "passed": passed, "note": note})

    for case_row in _cases(records):
        case = case_row["case"]
        fastkd = _one(records, case=case, provider="fastkd")
        if device == "cuda":
            if (case_row["dtype"] == "bf16" and case_row["mode"] == "fwd_bwd"
                    and case_row["vocab"] >= GPU_MIN_VOCAB_FOR_BANDWIDTH):
                if _ok(fastkd):
                    frac = fastkd["fraction_of_copy"]
                    add("fastkd fwd+bwd bandwidth / copy", case, f"{frac:.0%}",
                        f">= {GPU_COPY_FRACTION_TARGET:.0%}", frac >= GPU_COPY_FRACTION_TARGET)
                else:
                    add("fastkd fwd+bwd bandwidth / copy", case, "did not run",
                        f">= {GPU_COPY_FRACTION_TARGET:.0%}", False)
            baselines = [r for r in _by(records, case=case) if r["provider"] in BASELINES
                         and _ok(r)]
            if _ok(fastkd) and baselines:
                best = min(baselines, key=lambda r: r["time_ms"])
                speedup = best["time_ms"] / fastkd["time_ms"]
                add("fastkd speed-up vs fastest other", case,
                    f"{speedup:.2f}x vs {best['provider']}", f">= {SPEEDUP_TARGET}x",
                    speedup >= SPEEDUP_TARGET)
            elif _ok(fastkd):
                add("fastkd speed-up vs fastest other", case, "no baseline ran",
                    f">= {SPEEDUP_TARGET}x", None)
            if case_row["mode"] == "fwd_bwd":
                for name, limit_of, label in (
                    ("fastkd", lambda g: g + GRAD_BUFFER_SLACK_BYTES, "<= 1 grad buffer + 1 MiB"),
                    ("fastkd_inplace", lambda g: g * INPLACE_MEMORY_FRACTION,
                     f"<= {INPLACE_MEMORY_FRACTION:.0%} of a grad buffer"),
                ):
                    rec = _one(records, case=case, provider=name)
                    if _ok(rec) and rec.get("peak_mem_bytes") is not None:
                        limit = limit_of(rec["grad_buffer_bytes"])
                        add(f"{name} extra GPU memory", case,
                            f"{rec['peak_mem_bytes'] / MIB:.1f} MiB",
                            f"{label} ({limit / MIB:.1f} MiB)", rec["peak_mem_bytes"] <= limit)
        else:
            eager = _one(records, case=case, provider="eager")
            if _ok(fastkd) and _ok(eager):
                ratio = fastkd["time_ms"] / eager["time_ms"]
                add("CPU torch backend time vs eager", case, f"{ratio:.2f}x eager time",
                    "<= 1.00x", ratio <= 1.0)
                if fastkd.get("peak_mem_bytes") is not None and eager.get("peak_mem_bytes"):
                    mem = fastkd["peak_mem_bytes"] / eager["peak_mem_bytes"]
                    add("CPU torch backend peak memory vs eager", case,
                        f"{mem:.0%} of eager ({fastkd['peak_mem_bytes'] / MIB:.0f} vs "
                        f"{eager['peak_mem_bytes'] / MIB:.0f} MiB)",
                        f"<= {CPU_MEMORY_FRACTION_TARGET:.0%}",
                        mem <= CPU_MEMORY_FRACTION_TARGET)
    return rows


def _fmt(value, spec, empty="-"):
    return empty if value is None else format(value, spec)


def results_table(records: list[dict]) -> str:
    """Markdown table, one row per case and provider, grouped by case."""
    lines = [
        "| case | provider | status | time ms | GB/s | % copy | extra mem MiB "
        "| loss abs/rel err | grad abs/rel err |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    order = {c["case"]: i for i, c in enumerate(_cases(records))}
    for r in sorted(records, key=lambda r: (order[r["case"]], r["provider"])):
        if r["status"] != "ok":
            lines.append(f"| {r['case']} | {r['provider']} | {r['status']}: {r['reason']} "
                         "| | | | | | |")
            continue
        mem = r.get("peak_mem_bytes")
        loss_err = f"{r['loss_abs_err']:.1e} / {r['loss_rel_err']:.1e}"
        grad_err = ("-" if r.get("grad_abs_err") is None
                    else f"{r['grad_abs_err']:.1e} / {r['grad_rel_err']:.1e}")
        lines.append(
            f"| {r['case']} | {r['provider']} | ok | {r['time_ms']:.3f} "
            f"| {r['bandwidth_gbps']:.1f} | {r['fraction_of_copy']:.0%} "
            f"| {_fmt(None if mem is None else mem / MIB, '.1f')} | {loss_err} | {grad_err} |")
    return "\n".join(lines)


def targets_table(targets: list[dict]) -> str:
    if not targets:
        return "(no targets apply to these cases)"
    lines = ["| target | case | achieved | required | result |", "|---|---|---|---|---|"]
    for t in targets:
        result = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "FAIL")
        lines.append(f"| {t['target']} | {t['case']} | {t['achieved']} | {t['required']} "
                     f"| {result} |")
    return "\n".join(lines)


def markdown(meta: dict, records: list[dict], targets: list[dict]) -> str:
    env = ", ".join(f"{k} {v}" for k, v in meta.get("versions", {}).items())
    return "\n\n".join([
        f"# fastkd benchmark: {meta['device_name']}"
        + ("" if meta.get("complete", True) else " (INCOMPLETE: the run was cut short)"),
        f"{meta['date']}, {meta.get('elapsed_s')} s. {env}. Load average (1 min) at start/end: "
        f"{meta.get('load_average_1min', {}).get('start')}/"
        f"{meta.get('load_average_1min', {}).get('end')} on {meta.get('cpu_count')} CPUs"
        + (f", {meta.get('torch_threads')} torch threads. " if meta["device"] == "cpu" else ". ")
        + f"Shape set `{meta['shapes']}`; T={meta['temperature']}, "
        f"alpha={meta['alpha']}, ~{meta['ignored_fraction']:.0%} of labels ignored. "
        f"Time: {meta['timing']}. Memory: {meta['memory']}. Errors against float64: loss over "
        f"all rows, gradient over the first rows (see JSON). Bandwidth counts the minimal bytes "
        "(fastkd.bench.cases.minimal_bytes); % copy is that bandwidth over a device copy of the "
        "same byte count measured in the same run.",
        "## Results", results_table(records),
        "## Targets", targets_table(targets),
    ]) + "\n"


def plot(records: list[dict], out_dir: Path, title: str = "") -> list[Path]:
    """time_vs_V.png and bandwidth_vs_V.png: one panel per (dtype, mode, N), a line per provider."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dtype"], r["mode"], r["n_rows"]) for r in records})
    providers = sorted({r["provider"] for r in records})
    paths = []
    for metric, ylabel, fname in (("time_ms", "median time (ms)", "time_vs_V.png"),
                                  ("bandwidth_gbps", "effective bandwidth (GB/s)",
                                   "bandwidth_vs_V.png")):
        cols = min(len(panels), 4)
        nrows = (len(panels) + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.4 * nrows), squeeze=False)
        for ax, (dtype, mode, n_rows) in zip(axes.flat, panels, strict=False):
            panel = [r for r in records if (r["dtype"], r["mode"], r["n_rows"]) == (
                dtype, mode, n_rows) and r["status"] == "ok"]
            for name in providers:
                points = sorted((r["vocab"], r[metric]) for r in panel if r["provider"] == name)
                if points:
                    vocabs, values = zip(*points, strict=True)
                    ax.plot(vocabs, values, marker="o", label=name)
            if metric == "bandwidth_gbps":
                copy = sorted({(r["vocab"], r["copy_bandwidth_gbps"]) for r in panel})
                if copy:
                    vocabs, values = zip(*copy, strict=True)
                    ax.plot(vocabs, values, linestyle="--", color="gray", label="device copy")
            else:
                ax.set_yscale("log")
            ax.set_title(f"{dtype} {mode} N={n_rows}", fontsize=9)
            ax.set_xlabel("V")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(out_dir: Path, meta: dict, records: list[dict], make_plots: bool = True) -> dict:
    """Write results.json, results.md and the plots into out_dir; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = evaluate_targets(records, meta["device"])
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(
        {"meta": meta, "results": records, "targets": targets}, indent=1))
    paths["markdown"].write_text(markdown(meta, records, targets))
    if make_plots:
        try:
            paths["plots"] = plot(records, out_dir, f"fastkd-bench, {meta['device_name']}")
        except ImportError as exc:
            paths["plots"] = f"skipped: {exc} (pip install fastkd[bench])"
    return paths
