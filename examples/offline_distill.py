"""Offline distillation with fastkd: store a teacher's top-k once, train a student from the file.

Same corpus, tokenizer and models as ``distill_hf.py`` (whose helpers this script imports): the
Python standard library's sources, a byte-level BPE trained here, randomly initialised GPT-2s.
Nothing is downloaded. The run

1. trains the teacher on labels and saves it (``save_pretrained``) with its tokenizer;
2. writes the training windows to a ``.jsonl`` file and runs ``fastkd-topk dump`` on them (the
   CLI's ``main``, in this process): top-k ids, log-probs at the loss temperature and the tail
   log-mass, in safetensors shards;
3. trains three copies of one student initialisation on the same batches in the same order,
   each in a process of its own:

   * ``offline``: batches from ``fastkd.offline.TopKDataset`` + ``TopKCollator``, loss
     ``fastkd.topk_kd_loss`` (tail bucket with the stored tail), no teacher in memory;
   * ``online``: the teacher run live on each batch, loss ``fastkd.KDLoss`` on its full logits;
   * ``labels``: cross-entropy on the labels only, for reference;

   and checks that the first step's loss from the file equals ``topk_kd_loss`` on the teacher's
   top-k computed live;
4. reports held-out perplexity, wall time, peak memory and disk for each.

    python examples/offline_distill.py              # CPU defaults, a few minutes
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distill_hf  # noqa: E402  (the sibling example: corpus, tokenizer, models, perplexity)

import fastkd  # noqa: E402
from fastkd.offline import TopKCollator, TopKDataset, check_loss_settings, cli  # noqa: E402
from fastkd.offline.writer import topk_with_tail  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "runs" / "offline_distill"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=200, help="optimiser steps for each student")
    p.add_argument("--teacher-steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64, help="tokens predicted per window")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--corpus-chars", type=int, default=0, help="0: the whole standard library")
    p.add_argument("--train-windows", type=int, default=0,
                   help="windows dumped and trained on (0: steps x batch size, one epoch)")
    p.add_argument("--heldout-windows", type=int, default=512)
    p.add_argument("--teacher-n-layer", type=int, default=2)
    p.add_argument("--teacher-n-embd", type=int, default=128)
    p.add_argument("--student-n-layer", type=int, default=1)
    p.add_argument("--student-n-embd", type=int, default=64)
    p.add_argument("--k", type=int, default=64, help="teacher entries stored per token")
    # 1, not distill_hf's 2: at T=2 this small teacher's top 64 hold 17 % of its mass, and the
    # tail bucket carries too little to learn from (examples/OFFLINE.md)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--alpha", type=float, default=0.9)
    p.add_argument("--tail", choices=["bucket", "renormalize"], default="bucket",
                   help="bucket: log-probs dumped at --temperature, tail stored; renormalize: "
                   "dumped at T=1, softmax over the k entries at --temperature")
    p.add_argument("--values-dtype", default="float16", choices=["float16", "bfloat16",
                                                                  "float32"])
    p.add_argument("--no-pack-ids", action="store_true", help="int32 ids instead of packed")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: default)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--in-process", action="store_true",
                   help="run every phase in this process: faster to start, but then the peak "
                   "memory figures are the whole run's, not each phase's")
    p.add_argument("--phase", choices=["dump", "offline", "online", "labels"], default=None,
                   help=argparse.SUPPRESS)  # one phase of a run, in its own process
    return p.parse_args(argv)


def batch_order(num_windows: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Window indices for each step: seeded shuffles, reshuffled at each epoch."""
    gen = torch.Generator().manual_seed(seed)
    order: list[torch.Tensor] = []
    pool = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        if len(pool) < batch_size:
            pool = torch.cat([pool, torch.randperm(num_windows, generator=gen)])
        order.append(pool[:batch_size])
        pool = pool[batch_size:]
    return order


def optimiser(model: torch.nn.Module, lr: float, steps: int):
    """AdamW, 5 % linear warm-up, then cosine decay to 10 % of the peak."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def step_optimiser(model, opt, sched, loss) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    sched.step()


def rss_mib(field: str = "VmHWM") -> float:
    """This process's peak (VmHWM) or current (VmRSS) resident memory, from /proc (Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run_phase(args, phase: str) -> dict:
    """Run one phase (dump, offline or online student) in a fresh Python process, so that its
    peak memory is its own: the offline student's process never loads the teacher."""
    import os
    import subprocess

    if args.in_process:
        (phase_dump if phase == "dump" else phase_student)(*((args,) if phase == "dump"
                                                            else (args, phase)))
        return json.loads((args.out / f"phase_{phase}.json").read_text())
    argv = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, *args.argv]
    env = dict(os.environ)
    # the child imports the same fastkd as this process
    env["PYTHONPATH"] = os.pathsep.join([str(Path(fastkd.__file__).parent.parent),
                                         env.get("PYTHONPATH", "")])
    subprocess.run(argv, check=True, env=env)
    return json.loads((args.out / f"phase_{phase}.json").read_text())


def student_loop(name, student, batches, loss_fn, args, bar):
    opt, sched = optimiser(student, args.lr, args.steps)
    student.train()
    curve = []
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc=name, total=args.steps, **bar):
        logits = student(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
        loss = loss_fn(logits, batch)
        step_optimiser(student, opt, sched, loss)
        curve.append(loss.item())
    return {"seconds": time.perf_counter() - t0, "curve": curve}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = [a for a in argv if a != "--phase" and a != args.phase] if args.phase else argv
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.phase == "dump":
            return phase_dump(args)
        if args.phase in ("offline", "online", "labels"):
            return phase_student(args, args.phase)
        return run(args)
    finally:
        torch.set_num_threads(threads_before)


def dump_temperature(args) -> float:
    return args.temperature if args.tail == "bucket" else 1.0


def write_phase(args, phase: str, result: dict) -> dict:
    result.update(peak_rss_mib=rss_mib("VmHWM"))
    (args.out / f"phase_{phase}.json").write_text(json.dumps(result, indent=1))
    return result


def phase_dump(args) -> dict:
    """``fastkd-topk dump`` over the training windows (its ``main``, in this process)."""
    n_positions = args.seq_len + 1
    cli_args = ["dump", "--teacher", str(args.out / "teacher"), "--data",
                str(args.out / "train_windows.jsonl"), "--out", str(args.out / "topk"),
                "--k", str(args.k), "--temperature", str(dump_temperature(args)),
                "--seq-len", str(n_positions), "--values-dtype", args.values_dtype,
                "--batch-tokens", str(8 * n_positions)]
    if not args.no_pack_ids:
        cli_args.append("--pack-ids")
    if args.no_progress:
        cli_args.append("--no-progress")
    start_rss = rss_mib("VmRSS")
    t0 = time.perf_counter()
    if cli.main(cli_args) != 0:
        raise RuntimeError("fastkd-topk dump failed")
    return write_phase(args, "dump", {"seconds": time.perf_counter() - t0,
                                      "rss_before_mib": start_rss})


def load_run(args):
    """What both students share, from --out: tokenizer, dataset, batches, init, held-out."""
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(args.out / "teacher")
    dataset = TopKDataset(args.out / "topk", tok, student_vocab_size=len(tok))
    check_loss_settings(dataset.manifest, temperature=args.temperature, tail=args.tail)
    order = batch_order(len(dataset), args.batch_size, args.steps, args.seed + 2)
    collate = TopKCollator(tok.pad_token_id, values_dtype=torch.float32)

    def loader():
        return torch.utils.data.DataLoader(dataset, batch_sampler=[o.tolist() for o in order],
                                           collate_fn=collate)

    return tok, dataset, loader


def losses(args, teacher):
    def topk_loss(logits, ids, values, tail, labels):
        return fastkd.topk_kd_loss(logits[:, :-1], ids[:, :-1], values[:, :-1], labels[:, 1:],
                                   temperature=args.temperature, alpha=args.alpha,
                                   tail=args.tail, teacher_tail_logprob=tail[:, :-1]
                                   if args.tail == "bucket" else None)

    def offline_loss(logits, batch):
        return topk_loss(logits, batch["teacher_topk_ids"], batch["teacher_topk_values"],
                         batch["teacher_tail_logprob"], batch["labels"])

    dense = fastkd.KDLoss(temperature=args.temperature, alpha=args.alpha)

    def online_loss(logits, batch):
        with torch.no_grad():
            t_logits = teacher(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
        return dense(logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:])

    def labels_loss(logits, batch):
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                 batch["labels"][:, 1:].flatten())

    return topk_loss, offline_loss, online_loss, labels_loss


def phase_student(args, which: str) -> dict:
    """Train one student: offline (from the file, no teacher loaded), online (teacher live) or
    labels (cross-entropy only, for reference)."""
    start_rss = rss_mib("VmRSS")
    _, _, loader = load_run(args)
    teacher = None
    if which == "online":
        teacher = transformers.AutoModelForCausalLM.from_pretrained(args.out / "teacher")
        teacher.eval().requires_grad_(False)
    _, offline_loss, online_loss, labels_loss = losses(args, teacher)
    loss_fn = {"offline": offline_loss, "online": online_loss, "labels": labels_loss}[which]
    student = transformers.AutoModelForCausalLM.from_pretrained(args.out / "student_init")
    bar = dict(disable=args.no_progress, dynamic_ncols=True)
    result = student_loop(which, student, loader(), loss_fn, args, bar)
    held = torch.load(args.out / "heldout.pt")
    result["perplexity"] = distill_hf.perplexity(student, *held, 4 * args.batch_size,
                                                 torch.device("cpu"))
    result["rss_before_mib"] = start_rss
    return write_phase(args, which, result)


def run(args) -> dict:
    started = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bar = dict(disable=args.no_progress, dynamic_ncols=True)
    corpus = distill_hf.load_stdlib_corpus(args.corpus_chars)
    tok = distill_hf.train_tokenizer(corpus.train_texts, args.vocab_size)
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(distill_hf.EOS_TOKEN)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok,
                                                  eos_token=distill_hf.EOS_TOKEN,
                                                  pad_token=distill_hf.EOS_TOKEN)
    train_x, train_y, train_m = distill_hf.make_windows(tok, corpus.train_texts, args.seq_len)
    held_x, held_y, held_m = distill_hf.make_windows(tok, corpus.heldout_texts, args.seq_len)
    if 0 < args.heldout_windows < len(held_x):
        keep = torch.linspace(0, len(held_x) - 1, args.heldout_windows).round().long()
        held_x, held_y, held_m = held_x[keep], held_y[keep], held_m[keep]
    torch.save((held_x, held_y, held_m), out / "heldout.pt")
    n_windows = min(args.train_windows or args.steps * args.batch_size, len(train_x))
    subset = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(args.seed))
    # A window predicts seq_len tokens: it is stored as its inputs plus its last label, a
    # sequence of seq_len + 1 tokens with seq_len teacher rows (padding tokens dropped).
    with open(out / "train_windows.jsonl", "w", encoding="utf-8") as f:
        for w in subset[:n_windows].sort().values.tolist():
            n = int(train_m[w].sum())
            seq = train_x[w, :n].tolist() + [int(train_y[w, n - 1])]
            f.write(json.dumps({"input_ids": seq}) + "\n")
    n_positions = args.seq_len + 1

    # ---- teacher (labels only), saved as a Hugging Face model directory with its tokenizer
    t0 = time.perf_counter()
    teacher = distill_hf.gpt2(vocab_size, n_positions, args.teacher_n_layer, args.teacher_n_embd,
                              0, eos_id, args.seed)
    opt, sched = optimiser(teacher, args.teacher_lr, args.teacher_steps)
    teacher.train()
    for indices in tqdm(batch_order(len(train_x), args.batch_size, args.teacher_steps,
                                               args.seed), desc="teacher", **bar):
        logits = teacher(input_ids=train_x[indices], attention_mask=train_m[indices]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), train_y[indices].flatten(),
                                                 ignore_index=distill_hf.IGNORE_INDEX)
        step_optimiser(teacher, opt, sched, loss)
    teacher.eval().requires_grad_(False)
    teacher_seconds = time.perf_counter() - t0
    teacher.save_pretrained(out / "teacher")
    hf_tok.save_pretrained(out / "teacher")
    init = distill_hf.gpt2(vocab_size, n_positions, args.student_n_layer, args.student_n_embd,
                           0, eos_id, args.seed + 1)
    init.save_pretrained(out / "student_init")

    # ---- the dump, then each student, in processes of their own
    shutil.rmtree(out / "topk", ignore_errors=True)  # a new teacher: never resume an old dump
    dump = run_phase(args, "dump")
    _, dataset, loader = load_run(args)
    rows = dataset.num_rows

    # the first batch's loss from the file against topk_kd_loss on the teacher's live top-k
    topk_loss, offline_loss, _, _ = losses(args, teacher)
    first = next(iter(loader()))
    with torch.no_grad():
        logits = init(input_ids=first["input_ids"], attention_mask=first["attention_mask"]).logits
        t_logits = teacher(input_ids=first["input_ids"],
                           attention_mask=first["attention_mask"]).logits
        b, length = t_logits.shape[:2]
        live_ids, live_values, live_tail = topk_with_tail(t_logits.flatten(0, 1), args.k,
                                                          dump_temperature(args))
        # (rows the file holds as padding, the last token's and the padding's, have label -100
        # once shifted: ignored rows either way)
        live_ids, live_values = (t.reshape(b, length, args.k) for t in (live_ids, live_values))
        first_file = offline_loss(logits, first).item()
        first_live = topk_loss(logits, live_ids, live_values, live_tail.reshape(b, length),
                               first["labels"]).item()

    students = {name: run_phase(args, name) for name in ("offline", "online", "labels")}
    m = dataset.manifest
    report = {
        "perplexity_heldout": {
            "teacher": distill_hf.perplexity(teacher, held_x, held_y, held_m,
                                             4 * args.batch_size, torch.device("cpu")),
            **{f"student_{n}": r["perplexity"] for n, r in students.items()}},
        "first_step_loss": {"from_file": first_file, "live_topk": first_live,
                            "abs_diff": abs(first_file - first_live)},
        "dump": {"seconds": dump["seconds"], "rows": rows,
                 "rows_per_second": rows / dump["seconds"], "peak_rss_mib": dump["peak_rss_mib"],
                 "rss_before_mib": dump["rss_before_mib"], "disk_bytes": dataset.disk_bytes,
                 "disk_bytes_per_row": dataset.disk_bytes / rows,
                 "manifest_bytes_per_row": m.bytes_per_row, "shards": dataset.num_shards,
                 "k": m.k, "id_bits": m.id_bits or 32, "values_dtype": m.values_dtype,
                 "temperature": m.temperature},
        "students": {n: {k: r[k] for k in ("seconds", "peak_rss_mib", "rss_before_mib")}
                     | {"final_loss": r["curve"][-1]} for n, r in students.items()},
        "teacher": {"seconds": teacher_seconds,
                    "parameter_bytes": sum(p.numel() * p.element_size()
                                           for p in teacher.parameters())},
        "dense_teacher_logits_bytes_fp16": rows * vocab_size * 2,
        "corpus": {"train_windows": n_windows, "rows": rows, "vocab_size": vocab_size,
                   "heldout_tokens": int(held_m.sum())},
        "runtime_seconds": time.perf_counter() - started,
        "curves": {n: r["curve"] for n, r in students.items()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "fastkd": fastkd.__version__, "threads": torch.get_num_threads()},
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print_summary(report)
    return report


def print_summary(r: dict) -> None:
    ppl, d, s = r["perplexity_heldout"], r["dump"], r["students"]
    print(f"\nheld-out perplexity ({r['corpus']['heldout_tokens']:,} tokens): teacher "
          f"{ppl['teacher']:.2f}, offline student {ppl['student_offline']:.2f}, online student "
          f"{ppl['student_online']:.2f}, labels-only student {ppl['student_labels']:.2f}")
    print(f"dump: {d['rows']:,} rows in {d['seconds']:.1f} s ({d['rows_per_second']:,.0f} "
          f"rows/s), {d['disk_bytes'] / 2**20:.2f} MiB on disk, {d['disk_bytes_per_row']:.1f} "
          f"B/row (k={d['k']}, {d['id_bits']}-bit ids, {d['values_dtype']}), peak RSS "
          f"{d['peak_rss_mib']:.0f} MiB; the dense fp16 logits would take "
          f"{r['dense_teacher_logits_bytes_fp16'] / 2**20:.1f} MiB")
    for name in ("offline", "online", "labels"):
        print(f"student {name}: {s[name]['seconds']:.1f} s, peak RSS "
              f"{s[name]['peak_rss_mib']:.0f} MiB (process after imports "
              f"{s[name]['rss_before_mib']:.0f}), final loss {s[name]['final_loss']:.4f}")
    f = r["first_step_loss"]
    print(f"first-step loss from the file {f['from_file']:.6f} vs live top-k "
          f"{f['live_topk']:.6f} (|diff| {f['abs_diff']:.2e}); total {r['runtime_seconds']:.0f} s")


if __name__ == "__main__":
    main()
