"""Distil a small GPT-2 into a smaller one with fastkd.hf.KDTrainer, on Python's standard library.

Everything is built locally, nothing is downloaded: the corpus is the standard library's source
files, the byte-level BPE tokenizer is trained here with `tokenizers`, and both models are
randomly initialised `transformers` GPT-2s sharing that vocabulary.

The run trains the teacher on labels with a plain ``transformers.Trainer``, then three copies of
one student initialisation on the same batches, in the same order, with the same optimiser:

* ``fused``: ``fastkd.hf.KDTrainer(fused_linear=True)``: ``fastkd.linear_kd_loss`` on the hidden
  states and lm_head weights, no (batch, seq, vocab) logits;
* ``logits``: ``KDTrainer(fused_linear=False)``: both models' logits and ``fastkd.kd_loss``;
* ``labels_only``: ``transformers.Trainer``, cross-entropy on the next-token labels, no teacher.

The first two compute the same loss (the largest gap between their curves is reported); the
distilled students should reach a lower held-out perplexity than the labels-only one. The peak
memory of a training step is measured for both KD paths, each in a fresh process. Outputs under
``--out``: ``curves.png``, ``report.json`` and the trained ``tokenizer.json``.

    python examples/distill_hf.py                     # CPU defaults, a few minutes
    python examples/distill_hf.py --device cuda --threads 0 --steps 3000 --teacher-steps 6000 \\
        --batch-size 64 --seq-len 256 --heldout-windows 0 --teacher-n-layer 8 \\
        --teacher-n-embd 512 --student-n-layer 4 --student-n-embd 256
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
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
from transformers import GPT2Config, GPT2LMHeadModel

import fastkd
from fastkd.hf import KDTrainer

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot loads)

IGNORE_INDEX = -100
EOS_TOKEN = "<|endoftext|>"
# One file in ten is held out: enough text for a stable perplexity, the rest for training.
HOLDOUT_EVERY = 10
# Dimensions per attention head when --*-n-head is not given (GPT-2 small uses 64; these are tiny).
HEAD_DIM = 32
DEFAULT_OUT = Path(__file__).resolve().parent / "runs" / "distill_hf"
STUDENTS = ("fused", "logits", "labels_only")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Distil a GPT-2 teacher into a smaller GPT-2 with fastkd.hf.KDTrainer, "
        "offline, on the Python standard library's source code.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
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
    # distribution is the richer signal (README).
    p.add_argument("--alpha", type=float, default=0.9, help="weight of the divergence term")
    p.add_argument("--divergence", default="forward_kl", choices=fastkd.DIVERGENCES,
                   help="divergence between teacher and student distributions")
    # Not 3e-3: there the students' training is chaotic enough that rounding-level differences
    # between the two KD students grow into different minima (README).
    p.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (students)")
    p.add_argument("--teacher-lr", type=float, default=3e-3, help="peak AdamW lr, teacher")
    p.add_argument("--eval-every", type=int, default=25, help="steps between held-out evaluations")
    p.add_argument("--eval-windows", type=int, default=64,
                   help="held-out windows scored during training, for the curves")
    p.add_argument("--heldout-windows", type=int, default=512,
                   help="held-out windows in the final perplexities, evenly spaced (0: all)")
    p.add_argument("--no-memory", action="store_true",
                   help="skip measuring each KD path's peak step memory in a fresh process")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch (0: torch's default). These matrices are too small "
                   "to gain from more, and on a shared machine extra threads slow them down")
    p.add_argument("--no-progress", action="store_true",
                   help="print no held-out perplexity lines during training")
    p.add_argument("--memory-batch-sizes", default="8,128",
                   help="windows per step at which each KD path's peak step memory is measured "
                   "(comma-separated; the training batch is too small to need chunking)")
    p.add_argument("--memory-probe", choices=("fused", "logits"), help=argparse.SUPPRESS)
    p.add_argument("--memory-probe-batch-size", type=int, help=argparse.SUPPRESS)
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




class Windows(torch.utils.data.Dataset):
    """Trainer rows: input_ids, attention_mask, labels (HF convention, = input_ids with padding
    ignored) and shift_labels (the next token of each position, across the window's end), which
    both trainers use as the targets."""

    def __init__(self, input_ids, next_labels, mask):
        self.input_ids, self.next_labels, self.mask = input_ids, next_labels, mask

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        labels = torch.where(self.mask[i].bool(), self.input_ids[i], IGNORE_INDEX)
        return {"input_ids": self.input_ids[i], "attention_mask": self.mask[i],
                "labels": labels, "shift_labels": self.next_labels[i]}


# ----------------------------------------------------------------------------- models


def gpt2(vocab_size: int, seq_len: int, n_layer: int, n_embd: int, n_head: int, eos_id: int,
         seed: int) -> GPT2LMHeadModel:
    n_head = n_head or max(1, n_embd // HEAD_DIM)
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
        # No dropout: the two KD students must run the same computation, so that any gap between
        # their curves comes from the loss implementations alone, not from different masks.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def training_args(args, out: Path, steps: int, lr: float, device: torch.device, seed: int):
    """AdamW, 5 % linear warm-up then cosine decay to 10 % of the peak, clipping at 1."""
    return transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, weight_decay=0.01, warmup_steps=max(1, steps // 20),
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=device.type == "cpu", seed=seed, data_seed=seed,
        # shift_labels is not a GPT-2 forward argument: keep it for the labels-only Trainer.
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
    )


class HeldOutCurve(transformers.TrainerCallback):
    """Held-out perplexity every `every` steps, for the curves (printed unless `quiet`)."""

    def __init__(self, name: str, score, every: int, quiet: bool):
        self.name, self.score, self.every, self.quiet = name, score, every, quiet
        self.steps, self.values = [], []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.steps.append(state.global_step)
            self.values.append(self.score(model))

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The step's log comes after on_step_end: print the perplexity with that step's loss.
        if not self.quiet and "loss" in (logs or {}) and self.steps[-1:] == [state.global_step]:
            print(f"  {self.name:<11} step {state.global_step:>5}  loss {logs['loss']:.4f}  "
                  f"held-out perplexity {self.values[-1]:.2f}", flush=True)


def quiet(trainer):
    """Drop the Trainer's per-step printing of its logs (the curves are in the report)."""
    trainer.remove_callback(transformers.PrinterCallback)
    trainer.remove_callback(transformers.ProgressCallback)
    return trainer


def kd_trainer(args, student, teacher, dataset, out: Path, device, fused: bool, steps: int,
               seed: int, callbacks=()):
    return KDTrainer(
        model=student, teacher_model=teacher, train_dataset=dataset, callbacks=list(callbacks),
        args=training_args(args, out, steps, args.lr, device, seed),
        temperature=args.temperature, alpha=args.alpha, divergence=args.divergence,
        ignore_index=IGNORE_INDEX, fused_linear=fused,
    )


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


# ----------------------------------------------------------------------------- memory


class PeakAfterFirstStep(transformers.TrainerCallback):
    """Peak of the tensor memory allocated during training step 2 (the first allocates what
    stays, such as the optimiser state, and initialises libraries).

    CUDA: torch.cuda.max_memory_allocated above the allocation before step 2. CPU: the peak of
    the tensors created in that step, counted by torch's MemTracker (a dispatch mode that follows
    every storage; None if this torch has none).
    """

    def __init__(self, device: torch.device):
        self.device, self.base, self.peak, self.tracker = device, None, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != 1:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        try:
            from torch.distributed._tools.mem_tracker import MemTracker
        except ImportError:
            return
        self.tracker = MemTracker()
        self.tracker.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 2:
            return
        if self.device.type == "cuda" and self.base is not None:
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            snapshot = self.tracker.get_tracker_snapshot("peak")
            self.peak = snapshot[torch.device("cpu")]["Total"]


def memory_probe(args) -> dict:
    """Peak tensor memory of KDTrainer's training step 2 (PeakAfterFirstStep), in a fresh process
    for each path."""
    device = resolve_device(args.device)
    fused = args.memory_probe == "fused"
    vocab = args.vocab_size
    teacher = gpt2(vocab, args.seq_len, args.teacher_n_layer, args.teacher_n_embd,
                   args.teacher_n_head, 0, args.seed).to(device).eval()
    student = gpt2(vocab, args.seq_len, args.student_n_layer, args.student_n_embd,
                   args.student_n_head, 0, args.seed + 1).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    steps = 2
    args.batch_size = args.memory_probe_batch_size or args.batch_size
    ids = torch.randint(1, vocab, (args.batch_size * steps, args.seq_len), generator=gen)
    dataset = Windows(ids, torch.roll(ids, -1, dims=1), torch.ones_like(ids))
    meter = PeakAfterFirstStep(device)
    with tempfile.TemporaryDirectory() as out:
        quiet(kd_trainer(args, student, teacher, dataset, Path(out), device, fused, steps,
                         args.seed, callbacks=[meter])).train()
    how = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
           else "torch MemTracker peak of the tensors created")
    # What the explicit-logits path stores beside the model: student and teacher logits and the
    # student's logits gradient, each (tokens, V) in float32 here.
    logits_bytes = 3 * args.batch_size * args.seq_len * vocab * 4
    return {"path": args.memory_probe, "peak_bytes": meter.peak,
            "measured_as": f"{how} in training step 2",
            "tokens_per_step": args.batch_size * args.seq_len,
            "three_logits_tensors_bytes": logits_bytes}


def measure_memory(argv, args) -> list[dict]:
    """Run memory_probe for both KD paths at each --memory-batch-sizes, each in its own fresh
    Python process."""
    results = []
    for batch_size in (int(b) for b in args.memory_batch_sizes.split(",") if b.strip()):
        for path in ("fused", "logits"):
            command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-probe",
                       path, "--memory-probe-batch-size", str(batch_size)]
            done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ),
                                  timeout=1800)
            if done.returncode != 0:
                raise RuntimeError(f"memory probe {path} failed:\n{done.stderr[-4000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------------- run


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if args.memory_probe:
            result = memory_probe(args)
            print(json.dumps(result))
            return result
        return run(args, argv)
    finally:
        # main() may run inside a larger process (the tests): leave its thread count as found.
        torch.set_num_threads(threads_before)


def log_values(trainer, key: str) -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry and "step" in entry
            and "train_runtime" not in entry]


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    started = time.perf_counter()
    device = resolve_device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()

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
    dataset = Windows(train_x, train_y, train_m)
    data_seconds = time.perf_counter() - started
    print(f"corpus: {len(corpus.train_files)} train / {len(corpus.heldout_files)} held-out "
          f"stdlib files, {int(train_m.sum()):,} / {int(held_m.sum()):,} tokens, "
          f"vocabulary {vocab_size}, device {device}")

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
    teacher_trainer = quiet(transformers.Trainer(
        model=teacher, train_dataset=dataset,
        args=training_args(args, args.out / "teacher", args.teacher_steps, args.teacher_lr,
                           device, args.seed)))
    print(f"teacher: {args.teacher_steps} steps", flush=True)
    teacher_trainer.train()
    teacher_curve = log_values(teacher_trainer, "loss")
    teacher.eval().requires_grad_(False)
    teacher_seconds = time.perf_counter() - t0

    # ---- students: one initialisation, three trainers, the same batches in the same order.
    t0 = time.perf_counter()
    init = gpt2(vocab_size, args.seq_len, args.student_n_layer, args.student_n_embd,
                args.student_n_head, eos_id, args.seed + 1)
    student_seed = args.seed + 2  # not the teacher's order: the students see batches afresh
    students, curves, components, eval_curves, seconds = {}, {}, {}, {}, {}
    for name in STUDENTS:
        t_student = time.perf_counter()
        student = copy.deepcopy(init).to(device).train()
        held_out = HeldOutCurve(name, lambda m: held_ppl(m, args.eval_windows), args.eval_every,
                                args.no_progress)
        out = args.out / name
        if name == "labels_only":
            trainer = transformers.Trainer(
                model=student, train_dataset=dataset, callbacks=[held_out],
                args=training_args(args, out, args.steps, args.lr, device, student_seed))
        else:
            trainer = kd_trainer(args, student, teacher, dataset, out, device, name == "fused",
                                 args.steps, student_seed, callbacks=[held_out])
        quiet(trainer).train()
        students[name] = student
        curves[name] = log_values(trainer, "loss")
        if name != "labels_only":
            components[name] = {"divergence": log_values(trainer, "kd_divergence"),
                                "ce": log_values(trainer, "kd_ce")}
        eval_curves[name] = {"steps": held_out.steps, "perplexity": held_out.values}
        seconds[name] = time.perf_counter() - t_student
    student_seconds = time.perf_counter() - t0

    memory = None if args.no_memory else measure_memory(argv, args)

    # ---- report
    t0 = time.perf_counter()
    ppl = {"teacher": held_ppl(teacher)}
    ppl.update({f"student_{name}": held_ppl(students[name]) for name in STUDENTS})
    gaps = [abs(a - b) for a, b in zip(curves["fused"], curves["logits"], strict=True)]
    max_gap = max(gaps)
    runtime = time.perf_counter() - started
    n_params = {"teacher": sum(p.numel() for p in teacher.parameters()),
                "student": sum(p.numel() for p in init.parameters())}
    best_kd = min(ppl["student_fused"], ppl["student_logits"])
    report = {
        "perplexity_heldout": ppl,
        "distilled_beats_labels_only": best_kd < ppl["student_labels_only"],
        "max_abs_loss_diff_fused_vs_logits": max_gap,
        "max_abs_loss_diff_step": gaps.index(max_gap) + 1,
        "first_loss_diff_fused_vs_logits": gaps[0],
        "peak_memory": memory,
        "final_train_loss": {name: curves[name][-1] for name in STUDENTS},
        "runtime_seconds": {"total": runtime, "data_and_tokenizer": data_seconds,
                            "teacher": teacher_seconds, "students": student_seconds,
                            "per_student": seconds, "final_eval": time.perf_counter() - t0},
        "parameters": n_params,
        "corpus": {"stdlib": sysconfig.get_paths()["stdlib"],
                   "train_files": len(corpus.train_files),
                   "heldout_files": corpus.heldout_files,
                   "train_tokens": int(train_m.sum()), "heldout_tokens": int(held_m.sum()),
                   "vocab_size": vocab_size},
        "curves": {"steps": list(range(1, len(curves["fused"]) + 1)), "train_loss": curves,
                   "kd_components": components, "teacher_train_loss": teacher_curve,
                   "eval": eval_curves},
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

    ax_loss.plot(steps, c["train_loss"]["fused"], label="KD loss, fused_linear=True")
    ax_loss.plot(steps, c["train_loss"]["logits"], "--", label="KD loss, fused_linear=False")
    ax_loss.plot(steps, c["kd_components"]["fused"]["ce"], alpha=0.7,
                 label="CE of the distilled student")
    ax_loss.plot(steps, c["train_loss"]["labels_only"], alpha=0.7, label="CE, labels-only student")
    ax_loss.set(title="Student training losses", xlabel="step", ylabel="nats / token")
    ax_loss.legend()

    gaps = [abs(a - b) for a, b in zip(c["train_loss"]["fused"], c["train_loss"]["logits"],
                                        strict=True)]
    # Exact zeros would vanish from a log axis: plot them at a floor far below float32 rounding
    # of losses of this size (~1e-7).
    floor = 1e-9
    ax_gap.semilogy(steps, [max(g, floor) for g in gaps])
    ax_gap.set(title="|fused - logits| KD loss of the two students", xlabel="step",
               ylabel="absolute difference")

    for name, style in (("fused", "o-"), ("logits", "x--"), ("labels_only", "s-")):
        ax_ppl.plot(c["eval"][name]["steps"], c["eval"][name]["perplexity"], style, label=name)
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
        (f"student, KDTrainer fused_linear=True ({params['student'] / 1e6:.2f} M params)",
         ppl["student_fused"]),
        ("student, KDTrainer fused_linear=False", ppl["student_logits"]),
        ("student, labels only", ppl["student_labels_only"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}} {value:10.2f}")
    verdict = "beats" if report["distilled_beats_labels_only"] else "does NOT beat"
    print(f"distilled student {verdict} the labels-only student")
    print(f"|fused - logits| training loss: first step "
          f"{report['first_loss_diff_fused_vs_logits']:.3e}, max "
          f"{report['max_abs_loss_diff_fused_vs_logits']:.3e} "
          f"(step {report['max_abs_loss_diff_step']})")
    for m in report["peak_memory"] or ():
        value = "n/a" if m["peak_bytes"] is None else f"{m['peak_bytes'] / 2**20:.1f} MiB"
        print(f"peak memory of a training step of {m['tokens_per_step']} tokens, {m['path']}: "
              f"{value} ({m['measured_as']}; the three (tokens, V) float32 logits tensors of "
              f"the explicit path: {m['three_logits_tensors_bytes'] / 2**20:.1f} MiB)")
    print(f"runtime {seconds['total']:.1f} s (data+tokenizer {seconds['data_and_tokenizer']:.1f}, "
          f"teacher {seconds['teacher']:.1f}, students {seconds['students']:.1f})")
    print(f"wrote {out / 'curves.png'} and {out / 'report.json'}")


if __name__ == "__main__":
    main()
