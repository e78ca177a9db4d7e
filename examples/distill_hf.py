"""Distil a small GPT-2 into a smaller one with fastkd, on Python's own standard library.

Everything is built locally, nothing is downloaded: the corpus is the standard library's source
files, the byte-level BPE tokenizer is trained here with `tokenizers`, and both models are
randomly initialised `transformers` GPT-2s sharing that vocabulary.

The run trains the teacher on labels, then trains three copies of one student initialisation on
the same batches with the same optimiser:

* ``fastkd``: ``fastkd.KDLoss(temperature=T, alpha=alpha)`` against the frozen teacher,
* ``reference``: the same loss written in plain PyTorch (``fastkd.reference.kd_loss``),
* ``labels-only``: plain cross-entropy on the next-token labels, no teacher.

The first two must trace the same loss curve (the largest gap is reported); the distilled student
should reach a lower held-out perplexity than the labels-only one. Outputs under ``--out``:
``curves.png``, ``report.json`` and the trained ``tokenizer.json``.

    python examples/distill_hf.py                     # CPU defaults, a few minutes
    python examples/distill_hf.py --device cuda --steps 3000 --teacher-steps 6000 \\
        --batch-size 64 --seq-len 256 --heldout-windows 0 --teacher-n-layer 8 \\
        --teacher-n-embd 512 --student-n-layer 4 --student-n-embd 256
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sysconfig
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import matplotlib
import tokenizers
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm.auto import tqdm
from transformers import GPT2Config, GPT2LMHeadModel

import fastkd

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

IGNORE_INDEX = -100
EOS_TOKEN = "<|endoftext|>"
# One file in ten is held out: enough text for a stable perplexity, the rest for training.
HOLDOUT_EVERY = 10
# Dimensions per attention head when --*-n-head is not given (GPT-2 small uses 64; these are tiny).
HEAD_DIM = 32
DEFAULT_OUT = Path(__file__).resolve().parent / "runs" / "distill_hf"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Distil a GPT-2 teacher into a smaller GPT-2 with fastkd.KDLoss, offline, "
        "on the Python standard library's source code.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int, default=0, help="seeds the models and the batch order")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps for each student")
    p.add_argument("--teacher-steps", type=int, default=800, help="optimiser steps, teacher")
    p.add_argument("--batch-size", type=int, default=8, help="windows per step")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per window")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary")
    p.add_argument("--corpus-chars", type=int, default=0,
                   help="stop adding standard-library files after this many characters (0: all)")
    p.add_argument("--teacher-n-layer", type=int, default=2, help="teacher blocks")
    p.add_argument("--teacher-n-embd", type=int, default=128, help="teacher width")
    p.add_argument("--teacher-n-head", type=int, default=0, help="0: n_embd / 32")
    p.add_argument("--student-n-layer", type=int, default=1, help="student blocks")
    p.add_argument("--student-n-embd", type=int, default=64, help="student width")
    p.add_argument("--student-n-head", type=int, default=0, help="0: n_embd / 32")
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature T")
    # 0.9, not the usual 0.5: with a teacher this much better than the student, the teacher's
    # distribution is the richer signal; on the CPU defaults 0.5 wins by a third of the margin and
    # stops winning at a slightly higher learning rate (README).
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the KL term")
    # Not 3e-3: there the students' training is chaotic enough that rounding-level differences
    # between the fastkd and reference students grow into different minima (README).
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (students)")
    p.add_argument("--teacher-lr", type=float, default=3e-3, help="peak AdamW lr, teacher")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=64,
                   help="held-out windows scored during training, for the curves")
    p.add_argument("--heldout-windows", type=int, default=512,
                   help="held-out windows in the final perplexities, evenly spaced (0: all)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default). These matrices are too small "
                   "to gain from more, and on a shared machine extra threads slow them down")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


class Corpus(NamedTuple):
    train_texts: list[str]
    heldout_texts: list[str]
    train_files: list[str]
    heldout_files: list[str]


def load_stdlib_corpus(max_chars: int) -> Corpus:
    """Top-level standard-library modules, in a fixed order that mixes topics, split by file.

    Sorting by a CRC of the file name (not by the name) keeps the order identical on every run and
    machine with the same Python, while spreading e.g. the email* or multiprocessing-like families
    over both splits; every HOLDOUT_EVERY-th file is held out, starting with the first, so even a
    tiny --corpus-chars has a held-out file.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(root.glob("*.py"), key=lambda p: (zlib.crc32(p.name.encode()), p.name))
    if not paths:
        raise RuntimeError(f"no standard-library sources found under {root}")
    corpus = Corpus([], [], [], [])
    total = 0
    for i, path in enumerate(paths):
        if max_chars and total >= max_chars:
            break
        # A few modules carry non-UTF-8 bytes in comments; they must not stop the example.
        text = path.read_text(encoding="utf-8", errors="replace")
        total += len(text)
        if i % HOLDOUT_EVERY == 0:
            corpus.heldout_texts.append(text)
            corpus.heldout_files.append(path.name)
        else:
            corpus.train_texts.append(text)
            corpus.train_files.append(path.name)
    if not corpus.train_texts:
        raise RuntimeError("--corpus-chars is too small to leave a training file")
    return corpus


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so source code never maps to <unk>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def make_windows(tok: Tokenizer, texts: list[str], seq_len: int):
    """Cut each file (plus EOS) into seq_len-token windows; the tail of a file is padded.

    Returns input_ids, labels and attention_mask, each (windows, seq_len). labels[t] is the token
    after input_ids[t], or IGNORE_INDEX on padding. Windows never cross file boundaries, so the
    padding is real: every file ends in a partial window.
    """
    eos_id = tok.token_to_id(EOS_TOKEN)
    inputs, labels = [], []
    for encoding in tok.encode_batch(texts):
        ids = encoding.ids + [eos_id]
        # Consecutive windows overlap by one token: the last label of one is the first input of
        # the next, so every token of the file is predicted exactly once.
        for start in range(0, len(ids) - 1, seq_len):
            chunk = ids[start : start + seq_len + 1]
            pad = seq_len + 1 - len(chunk)
            # EOS as the padding id: it is never attended to nor predicted, any id would do.
            inputs.append(chunk[:-1] + [eos_id] * pad)
            labels.append(chunk[1:] + [IGNORE_INDEX] * pad)
    input_ids = torch.tensor(inputs, dtype=torch.long)
    label_ids = torch.tensor(labels, dtype=torch.long)
    return input_ids, label_ids, (label_ids != IGNORE_INDEX).long()


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


# ----------------------------------------------------------------------------- models


def gpt2(vocab_size: int, seq_len: int, n_layer: int, n_embd: int, n_head: int, eos_id: int,
         seed: int) -> GPT2LMHeadModel:
    n_head = n_head or max(1, n_embd // HEAD_DIM)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        # No dropout: the fastkd and reference students must run the same computation, so that
        # any gap between their curves comes from the loss alone, not from different masks.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def optimiser(model: torch.nn.Module, lr: float, steps: int):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)  # 5 % linear warm-up, then cosine decay to 10 % of the peak

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


@torch.no_grad()
def perplexity(model, input_ids, labels, mask, batch_size: int, device) -> float:
    """exp(mean next-token NLL) over every non-padding position."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, len(input_ids), batch_size):
        x = input_ids[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        m = mask[start : start + batch_size].to(device)
        logits = model(input_ids=x, attention_mask=m).logits
        nll += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int(m.sum())
    model.train(was_training)
    return math.exp(nll / max(count, 1))


# ----------------------------------------------------------------------------- run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return run(args)
    finally:
        # main() may run inside a larger process (the tests): leave its thread count as found.
        torch.set_num_threads(threads_before)


def run(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    bar = dict(disable=args.no_progress, dynamic_ncols=True)

    corpus = load_stdlib_corpus(args.corpus_chars)
    tok = train_tokenizer(corpus.train_texts, args.vocab_size)
    tok.save(str(args.out / "tokenizer.json"))
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(EOS_TOKEN)
    train_x, train_y, train_m = make_windows(tok, corpus.train_texts, args.seq_len)
    held_x, held_y, held_m = make_windows(tok, corpus.heldout_texts, args.seq_len)
    if 0 < args.heldout_windows < len(held_x):
        # Evenly spaced, so that a cap still samples every held-out file, not just the first.
        keep = torch.linspace(0, len(held_x) - 1, args.heldout_windows).round().long()
        held_x, held_y, held_m = held_x[keep], held_y[keep], held_m[keep]
    data_seconds = time.perf_counter() - started
    print(f"corpus: {len(corpus.train_files)} train / {len(corpus.heldout_files)} held-out "
          f"stdlib files, {int(train_m.sum()):,} / {int(held_m.sum()):,} tokens, "
          f"vocabulary {vocab_size}, device {device}")

    def batch(indices):
        return (train_x[indices].to(device), train_y[indices].to(device),
                train_m[indices].to(device))

    # Scoring keeps no activations for backward, so it affords larger batches than training.
    eval_batch_size = 4 * args.batch_size

    def held_ppl(model, windows=None):
        # A subset for the curves, evenly spaced like the cap above.
        keep = torch.linspace(0, len(held_x) - 1, min(windows or len(held_x), len(held_x)))
        keep = keep.round().long()
        return perplexity(model, held_x[keep], held_y[keep], held_m[keep], eval_batch_size, device)

    # ---- teacher: labels only, longer than the students, so it knows more than they can learn.
    t0 = time.perf_counter()
    teacher = gpt2(vocab_size, args.seq_len, args.teacher_n_layer, args.teacher_n_embd,
                   args.teacher_n_head, eos_id, args.seed).to(device)
    opt, sched = optimiser(teacher, args.teacher_lr, args.teacher_steps)
    teacher.train()
    teacher_curve = []
    progress = tqdm(batch_order(len(train_x), args.batch_size, args.teacher_steps, args.seed),
                    desc="teacher", **bar)
    for indices in progress:
        x, y, m = batch(indices)
        loss = F.cross_entropy(teacher(input_ids=x, attention_mask=m).logits.flatten(0, 1),
                               y.flatten(), ignore_index=IGNORE_INDEX)
        step_optimiser(teacher, opt, sched, loss)
        teacher_curve.append(loss.item())
        progress.set_postfix(ce=f"{teacher_curve[-1]:.3f}")
    teacher.eval().requires_grad_(False)
    teacher_seconds = time.perf_counter() - t0

    # ---- students: one initialisation, three losses, the same batches in the same order.
    t0 = time.perf_counter()
    init = gpt2(vocab_size, args.seq_len, args.student_n_layer, args.student_n_embd,
                args.student_n_head, eos_id, args.seed + 1).to(device)
    criterion = fastkd.KDLoss(temperature=args.temperature, alpha=args.alpha,
                              ignore_index=IGNORE_INDEX)

    def reference_loss(student_logits, teacher_logits, labels):
        return fastkd.reference.kd_loss(student_logits, teacher_logits, labels,
                                        temperature=args.temperature, alpha=args.alpha,
                                        ignore_index=IGNORE_INDEX)

    def labels_only_loss(student_logits, _teacher_logits, labels):
        return F.cross_entropy(student_logits.flatten(0, 1), labels.flatten(),
                               ignore_index=IGNORE_INDEX)

    names = ("fastkd", "reference", "labels_only")
    losses = dict(zip(names, (criterion, reference_loss, labels_only_loss), strict=True))
    students, optims = {}, {}
    for name in names:
        students[name] = copy.deepcopy(init).train()
        optims[name] = optimiser(students[name], args.lr, args.steps)
    curves = {name: [] for name in names}
    train_ce = {name: [] for name in names}
    # The two KD students drift apart by rounding over the steps; scoring the fastkd student's own
    # logits with both losses each step isolates the loss implementations from that drift.
    same_logits_gap = []
    eval_steps, eval_ppl = [], {name: [] for name in ("fastkd", "labels_only")}

    student_seed = args.seed + 2  # not the teacher's order: the students see batches afresh
    progress = tqdm(batch_order(len(train_x), args.batch_size, args.steps, student_seed),
                    desc="students", **bar)
    for step, indices in enumerate(progress, start=1):
        x, y, m = batch(indices)
        with torch.no_grad():
            teacher_logits = teacher(input_ids=x, attention_mask=m).logits
        for name in names:
            logits = students[name](input_ids=x, attention_mask=m).logits
            loss = losses[name](logits, teacher_logits, y)
            step_optimiser(students[name], *optims[name], loss)
            curves[name].append(loss.item())
            with torch.no_grad():
                train_ce[name].append(labels_only_loss(logits, None, y).item())
                if name == "fastkd":
                    same_logits_gap.append(
                        abs(loss.item() - reference_loss(logits, teacher_logits, y).item()))
        if step % args.eval_every == 0 or step == args.steps:
            eval_steps.append(step)
            for name in eval_ppl:
                eval_ppl[name].append(held_ppl(students[name], args.eval_windows))
        progress.set_postfix(kd=f"{curves['fastkd'][-1]:.3f}",
                             ce=f"{curves['labels_only'][-1]:.3f}")
    student_seconds = time.perf_counter() - t0

    # ---- report
    t0 = time.perf_counter()
    ppl = {"teacher": held_ppl(teacher)}
    ppl.update({f"student_{name}": held_ppl(students[name]) for name in names})
    gaps = [abs(a - b) for a, b in zip(curves["fastkd"], curves["reference"], strict=True)]
    max_gap = max(gaps)
    runtime = time.perf_counter() - started
    n_params = {"teacher": sum(p.numel() for p in teacher.parameters()),
                "student": sum(p.numel() for p in init.parameters())}
    report = {
        "perplexity_heldout": ppl,
        "distilled_beats_labels_only": ppl["student_fastkd"] < ppl["student_labels_only"],
        "max_abs_loss_diff_fastkd_vs_reference": max_gap,
        "max_abs_loss_diff_step": gaps.index(max_gap) + 1,
        "max_abs_loss_diff_same_logits": max(same_logits_gap),
        "final_train_loss": {name: curves[name][-1] for name in names},
        "runtime_seconds": {"total": runtime, "data_and_tokenizer": data_seconds,
                            "teacher": teacher_seconds, "students": student_seconds,
                            "final_eval": time.perf_counter() - t0},
        "parameters": n_params,
        "corpus": {"stdlib": sysconfig.get_paths()["stdlib"],
                   "train_files": len(corpus.train_files),
                   "heldout_files": corpus.heldout_files,
                   "train_tokens": int(train_m.sum()), "heldout_tokens": int(held_m.sum()),
                   "vocab_size": vocab_size},
        "curves": {"steps": list(range(1, args.steps + 1)), "train_loss": curves,
                   "train_ce": train_ce, "teacher_train_ce": teacher_curve,
                   "same_logits_gap": same_logits_gap,
                   "eval_steps": eval_steps, "eval_perplexity": eval_ppl},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "environment": {"device": str(device), "python": platform.python_version(),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "tokenizers": tokenizers.__version__, "fastkd": fastkd.__version__},
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    plot(report, args.out / "curves.png")
    print_summary(report, args.out)
    return report


def plot(report: dict, path: Path) -> None:
    c = report["curves"]
    steps = c["steps"]
    fig, (ax_loss, ax_gap, ax_ppl) = plt.subplots(1, 3, figsize=(16, 4.5))

    ax_loss.plot(steps, c["train_loss"]["fastkd"], label="KD loss, fastkd.KDLoss")
    ax_loss.plot(steps, c["train_loss"]["reference"], "--", label="KD loss, reference")
    ax_loss.plot(steps, c["train_ce"]["fastkd"], alpha=0.7, label="CE of the distilled student")
    ax_loss.plot(steps, c["train_loss"]["labels_only"], alpha=0.7, label="CE, labels-only student")
    ax_loss.set(title="Student training losses", xlabel="step", ylabel="nats / token")
    ax_loss.legend()

    gaps = [abs(a - b) for a, b in zip(c["train_loss"]["fastkd"], c["train_loss"]["reference"],
                                        strict=True)]
    # Exact zeros would vanish from a log axis: plot them at a floor far below float32 rounding
    # of losses of this size (~1e-7).
    floor = 1e-9
    ax_gap.semilogy(steps, [max(g, floor) for g in gaps], label="between the two students")
    ax_gap.semilogy(steps, [max(g, floor) for g in c["same_logits_gap"]], alpha=0.7,
                    label="both losses on the same logits")
    ax_gap.set(title="|fastkd - reference| KD loss", xlabel="step", ylabel="absolute difference")
    ax_gap.legend()

    ax_ppl.plot(c["eval_steps"], c["eval_perplexity"]["fastkd"], "o-", label="distilled (fastkd)")
    ax_ppl.plot(c["eval_steps"], c["eval_perplexity"]["labels_only"], "s-", label="labels only")
    ax_ppl.axhline(report["perplexity_heldout"]["teacher"], color="grey", ls=":", label="teacher")
    ax_ppl.set(title="Held-out perplexity (subset)", xlabel="step", ylabel="perplexity")
    ax_ppl.legend()

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_summary(report: dict, out: Path) -> None:
    ppl = report["perplexity_heldout"]
    params = report["parameters"]
    seconds = report["runtime_seconds"]
    print()
    print(f"held-out perplexity ({report['corpus']['heldout_tokens']:,} tokens)")
    rows = [
        (f"teacher ({params['teacher'] / 1e6:.2f} M params)", ppl["teacher"]),
        (f"student, fastkd.KDLoss ({params['student'] / 1e6:.2f} M params)", ppl["student_fastkd"]),
        ("student, reference KD loss", ppl["student_reference"]),
        ("student, labels only", ppl["student_labels_only"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}} {value:10.2f}")
    verdict = "beats" if report["distilled_beats_labels_only"] else "does NOT beat"
    print(f"distilled student {verdict} the labels-only student")
    print(f"max |fastkd - reference| training loss: "
          f"{report['max_abs_loss_diff_fastkd_vs_reference']:.3e} "
          f"(step {report['max_abs_loss_diff_step']}); on the same logits: "
          f"{report['max_abs_loss_diff_same_logits']:.3e}")
    print(f"runtime {seconds['total']:.1f} s (data+tokenizer {seconds['data_and_tokenizer']:.1f}, "
          f"teacher {seconds['teacher']:.1f}, students {seconds['students']:.1f})")
    print(f"wrote {out / 'curves.png'} and {out / 'report.json'}")


if __name__ == "__main__":
    main()
