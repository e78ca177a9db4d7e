"""Fused linear KD: hidden states x lm_head -> the KD loss, without N x V logits.

For each model, z = softcap(scale * (hidden @ weight.T + bias)), softcap(x) = c * tanh(x / c), and
the loss is fastkd.kd_loss(z_s, z_t, labels, ...). The rows go through in chunks of C tokens; per
chunk, with G = w * dloss/dz the gradient the fused row kernel writes in its forward (w the
reduction weight, known before the first chunk because it only depends on the labels):

    z_raw  = H_c @ W.T + b                                   GEMM 1 (student), 2 (teacher)
    z      = softcap(scale * z_raw)                          fp32 chunk buffer (C, V)
    G      = kd_rows(z_s, z_t)                               written over the z_s buffer
    dz_raw = G * scale * (1 - (z / c)^2)                     chain rule of scale and softcap
    dH_c   = dz_raw @ W                                      GEMM 3
    dW    += dz_raw.T @ H_c,   db += dz_raw.sum(0)           GEMM 4

Four GEMMs for a frozen teacher (two more for each teacher tensor that requires grad), none of
them repeated in backward: backward only multiplies the saved dH, dW, db by grad_output, which is
skipped on the device when it is 1. reduction="none" is the exception: a per-row grad_output
cannot rescale dW = sum_i dz_i.T h_i after the fact, so that forward computes the loss only and
the backward runs the chunks again with grad_output as row weights (six GEMMs in all).

Memory (fp32 chunk buffers, e = 4 bytes): C V e for the student logits, which become its gradient
in place; C V e for the teacher logits; one more C V e for each softcapped model that needs a
gradient (the tanh derivative) and for a teacher that requires grad. Then the gradients: N H_s
for dH and V H_s for dW; dW and db accumulate in fp32, so a bf16/fp16 weight costs an fp32 V H
accumulator (4 V H bytes) on top of its gradient. Where a GEMM cannot take half inputs with an
fp32 result (CPU), the weight is upcast once per call (another 4 V H bytes).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from . import _ops
from ._autograd import (
    KDLossComponents,
    SavedGradientLoss,
    make_components,
    reduce_rows,
    reduction_weight,
    refuse_double_backward,
    refuse_function_transforms,
)
from ._spec import (
    NUM_ROW_STATS,
    LossOptions,
    _check_number,
    check_labels,
    check_loss_options,
    check_normalizer,
)

__all__ = ["linear_kd_loss", "LinearKDLoss", "CHUNK_BUDGET_ELEMENTS", "default_chunk_size"]

# chunk_size=None: the largest chunk whose logits hold at most this many elements (C * V), per
# device type. On CPU 2^22 fp32 elements (16 MiB per buffer, C = 128 at V = 32000): below that the
# row kernel's own scratch dominates, and C = 128 rows still make full-speed CPU GEMMs. On GPU
# 2^27 (512 MiB per buffer) keeps the GEMMs large (C = 832 at V = 151936).
CHUNK_BUDGET_ELEMENTS = {"cuda": 1 << 27, "cpu": 1 << 22}
_DEFAULT_BUDGET = 1 << 22
# Chunks of at least this many rows are rounded down to a multiple of it (GEMM tile sizes).
_CHUNK_ALIGN = 64

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def default_chunk_size(n_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk when chunk_size=None: CHUNK_BUDGET_ELEMENTS[device] // V, within [1, N]."""
    budget = CHUNK_BUDGET_ELEMENTS.get(torch.device(device).type, _DEFAULT_BUDGET)
    chunk = max(1, budget // max(vocab, 1))
    if chunk >= _CHUNK_ALIGN:
        chunk -= chunk % _CHUNK_ALIGN
    return max(1, min(chunk, n_rows))


# ---------------------------------------------------------------------------------------------
# Validation (metadata only: no tensor values are read)


@dataclass(frozen=True)
class LinearPlan:
    """One validated call: the loss options, the projections' settings and the shape facts."""

    options: LossOptions
    normalizer: float | torch.Tensor | None
    leading_shape: torch.Size
    vocab: int
    chunk: int
    scales: tuple[float, float]
    softcaps: tuple[float | None, float | None]
    # Autocast dtype of the projections at the call (None: the tensors' own dtypes).
    cast_dtype: torch.dtype | None
    compute_dtype: torch.dtype
    # Which of (student hidden, weight, bias, teacher hidden, weight, bias) get a gradient.
    wants: tuple[bool, ...]
    name: str = "fastkd.linear_kd_loss"


def _check_tensor(name, value, *, optional=False):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
    if value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a float16/bfloat16/float32/float64 tensor, got "
                        f"{value.dtype}")


def _check_softcap(name, value):
    if value is None:
        return None
    value = _check_number(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be None or > 0 (softcap(x) = c * tanh(x / c)), got {value}")
    return value


def _check_scale(name, value):
    value = _check_number(name, value)
    if value <= 0.0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _check_head(side, hidden, weight, bias, autocast):
    h_name, w_name, b_name = f"{side}_hidden", f"{side}_weight", f"{side}_bias"
    _check_tensor(h_name, hidden)
    _check_tensor(w_name, weight)
    _check_tensor(b_name, bias, optional=True)
    if hidden.dim() < 1:
        raise ValueError(f"{h_name} must have shape (..., hidden), got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{w_name} must have shape (vocab, hidden), got {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{w_name} must have shape (vocab, {hidden.shape[-1]}) to match {h_name}'s hidden "
            f"size {hidden.shape[-1]}, got {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"{w_name} has an empty vocabulary (first dimension is 0)")
    if hidden.device != weight.device:
        raise ValueError(f"{h_name} must be on {w_name}'s device {weight.device}, got "
                         f"{hidden.device}")
    # A DTensor weight (FSDP2's fp32 master copy under mixed precision) is cast once when
    # gathered.
    if not autocast and not _is_dtensor(weight) and hidden.dtype != weight.dtype:
        raise TypeError(f"{h_name} ({hidden.dtype}) and {w_name} ({weight.dtype}) must have the "
                        "same dtype (or run under torch.autocast)")


def _check_bias(side, weight, bias, autocast):
    if bias is None:
        return
    w_name, b_name = f"{side}_weight", f"{side}_bias"
    if bias.shape != weight.shape[:1]:
        raise ValueError(f"{b_name} must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"{b_name} must be on {w_name}'s device {weight.device}, got "
                         f"{bias.device}")
    if not autocast and not _is_dtensor(weight) and bias.dtype != weight.dtype:
        raise TypeError(f"{b_name} ({bias.dtype}) must have {w_name}'s dtype {weight.dtype}")


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _no_autocast(device: torch.device):
    """The chunk loop casts explicitly; autocast must not recast its fp32 GEMMs."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# FSDP2: a DTensor lm_head is gathered once per call.


def _full_tensor(tensor, dtype):
    """A DTensor (FSDP2's sharded lm_head) as one plain tensor of `dtype`, gathered once.

    The gathered tensor's gradient is this rank's contribution only, so it is declared
    Partial("avg"): backward reduce-scatters it to the shards, averaged over the mesh as FSDP2
    averages every other gradient. (A plain full_tensor() would hand each shard its own rank's
    gradient rows, unreduced.) An fp32 master copy is cast to the hidden states' dtype once here.
    """
    if tensor is None or not _is_dtensor(tensor):
        return tensor
    from torch.distributed.tensor import Partial

    full = tensor.full_tensor(grad_placements=[Partial("avg")] * tensor.device_mesh.ndim)
    return full.to(dtype)


def _is_dtensor(tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(tensor, DTensor)


# ---------------------------------------------------------------------------------------------
# The chunk loop


class _Head:
    """One model's projection for the chunk loop, and its gradient accumulators."""

    def __init__(self, hidden, weight, bias, side: int, plan: LinearPlan, wants):
        self.scale, self.softcap = plan.scales[side], plan.softcaps[side]
        self.want_h, self.want_w, self.want_b = wants
        self.wants_grad = any(wants)
        cdtype = plan.compute_dtype
        self.cdtype = cdtype
        in_dtype = plan.cast_dtype or weight.dtype
        # Half GEMMs with an fp32 result exist on CUDA only; elsewhere upcast once per call.
        self.half_gemm = weight.is_cuda and in_dtype in _HALF_DTYPES
        self.gemm_dtype = in_dtype if self.half_gemm else cdtype
        self.hidden = hidden
        self.hidden_dtype = in_dtype  # the rounding of the hidden states before the GEMM
        self.weight = weight.to(in_dtype).to(self.gemm_dtype)
        self.bias = None if bias is None else bias.to(in_dtype).to(cdtype)
        self.weight_dtype = weight.dtype
        self.bias_dtype = None if bias is None else bias.dtype
        vocab, device = weight.shape[0], hidden.device
        self.dh = (torch.empty(hidden.shape, dtype=hidden.dtype, device=device)
                   if self.want_h else None)
        # dW and db accumulate in the compute dtype (fp32) over the chunks.
        self.dw = (torch.empty((vocab, weight.shape[1]), dtype=cdtype, device=device)
                   if self.want_w else None)
        self.db = torch.zeros(vocab, dtype=cdtype, device=device) if self.want_b else None
        self.first = True
        self.h_chunk = None
        self.tanh_grad = None

    def _mm(self, a, b):
        if self.half_gemm:
            return torch.mm(a.to(self.gemm_dtype), b, out_dtype=self.cdtype)
        return torch.mm(a, b)

    def logits(self, start, stop, out):
        """out (rows, V) <- softcap(scale * (H[start:stop] @ W.T + b)), in the compute dtype."""
        h = self.hidden[start:stop].to(self.hidden_dtype).to(self.gemm_dtype)
        self.h_chunk = h
        if self.half_gemm:
            torch.mm(h, self.weight.T, out_dtype=self.cdtype, out=out)
            if self.bias is not None:
                out.add_(self.bias)
            if self.scale != 1.0:
                out.mul_(self.scale)
        elif self.bias is not None:
            torch.addmm(self.bias, h, self.weight.T, beta=self.scale, alpha=self.scale, out=out)
        else:
            torch.mm(h, self.weight.T, out=out)
            if self.scale != 1.0:
                out.mul_(self.scale)
        if self.softcap is not None:
            out.div_(self.softcap).tanh_()
            if self.wants_grad:
                # d softcap(x)/dx = 1 - tanh^2, kept before the kernel overwrites the logits.
                self.tanh_grad = torch.mul(out, out).neg_().add_(1.0)
            out.mul_(self.softcap)
        return out

    def backprop(self, grad, start, stop):
        """grad (rows, V) = w * dloss/dz of the chunk: add its share to dH, dW and db.

        The logit scale is applied to dH here (N x H) and to dW, db once at the end, never to
        the chunk's V-wide gradient.
        """
        if self.softcap is not None:
            grad.mul_(self.tanh_grad)
            self.tanh_grad = None
        h = self.h_chunk
        if self.want_h:
            dh = self._mm(grad, self.weight)
            if self.scale != 1.0:
                dh.mul_(self.scale)
            self.dh[start:stop].copy_(dh)
        if self.want_w:
            # beta=0 on the first chunk: the uninitialised accumulator is never read.
            beta = 0.0 if self.first else 1.0
            if self.half_gemm:
                torch.addmm(self.dw, grad.to(self.gemm_dtype).T, h, out_dtype=self.cdtype,
                            beta=beta, out=self.dw)
            else:
                torch.addmm(self.dw, grad.T, h, beta=beta, out=self.dw)
        if self.want_b:
            self.db.add_(grad.sum(0))
        self.first = False
        self.h_chunk = None

    def grads(self):
        """(dH, dW, db) as (2-D gradient, shape) pairs in their tensors' dtypes, or None."""
        dh, dw, db = self.dh, self.dw, self.db
        if dw is not None:
            if self.first:  # no rows: no chunk wrote the accumulator
                dw.zero_()
            if self.scale != 1.0:
                dw.mul_(self.scale)
            dw = dw.to(self.weight_dtype)
        if db is not None:
            if self.scale != 1.0:
                db.mul_(self.scale)
            db = db.to(self.bias_dtype)
        return (
            None if dh is None else (dh.reshape(-1, dh.shape[-1]), dh.shape),
            None if dw is None else (dw, dw.shape),
            None if db is None else (db.view(1, -1), db.shape),
        )


def _run_chunks(plan: LinearPlan, wants, row_scale, hs, ws, bs, ht, wt, bt, labels):
    """(loss, components, grads) of one call, chunk by chunk.

    hs, ht: the hidden states as 2-D (N, H) views. wants: six flags (hidden, weight, bias of
    the student, then of the teacher). row_scale, when given, multiplies each row's gradient
    (reduction="none", in backward). grads: (2-D gradient, shape) or None per input.
    """
    options, device, cdtype = plan.options, hs.device, plan.compute_dtype
    n_rows, vocab, chunk = hs.shape[0], plan.vocab, plan.chunk
    student = _Head(hs, ws, bs, 0, plan, wants[:3])
    teacher = _Head(ht, wt, bt, 1, plan, wants[3:])
    weight = reduction_weight(labels, options, plan.leading_shape, plan.normalizer, device,
                              cdtype)
    stats = torch.empty((n_rows, NUM_ROW_STATS), dtype=cdtype, device=device)
    z_s = torch.empty((min(chunk, n_rows), vocab), dtype=cdtype, device=device)
    z_t = torch.empty_like(z_s)
    g_t = torch.empty_like(z_t) if teacher.wants_grad else None
    for start in range(0, n_rows, chunk):
        stop = min(start + chunk, n_rows)
        rows = stop - start
        zs = student.logits(start, stop, z_s[:rows])
        zt = teacher.logits(start, stop, z_t[:rows])
        # The student's gradient overwrites its logits (the kernel reads each row first).
        gs = zs if student.wants_grad else None
        gt = g_t[:rows] if g_t is not None else None
        _ops.kd_rows(zs, zt, labels[start:stop] if labels is not None else None, weight,
                     stats[start:stop], gs, gt, options.divergence, options.temperature,
                     options.alpha, options.beta, options.skew, options.label_smoothing,
                     options.z_loss, options.ignore_index)
        if row_scale is not None:
            factor = row_scale[start:stop, None].to(cdtype)
            if gs is not None:
                gs.mul_(factor)
            if gt is not None:
                gt.mul_(factor)
        if gs is not None:
            student.backprop(gs, start, stop)
        if gt is not None:
            teacher.backprop(gt, start, stop)
    loss, components = reduce_rows(stats, weight, options, plan.leading_shape, plan.normalizer)
    return loss, components, (*student.grads(), *teacher.grads(), None)


def _run_saved(plan: LinearPlan, *inputs):
    """SavedGradientLoss's run: everything in the forward, gradients saved for backward."""
    return _run_chunks(plan, plan.wants, None, *inputs)


class _RecomputedRows(torch.autograd.Function):
    """reduction="none": the forward computes the row losses only; backward runs the chunks
    again with grad_output as row weights (a per-row factor cannot rescale dW afterwards)."""

    @staticmethod
    def forward(ctx, plan, *inputs):
        loss, components, _ = _run_chunks(plan, (False,) * 6, None, *inputs)
        ctx.mark_non_differentiable(components)
        ctx.plan = plan
        ctx.save_for_backward(*inputs)
        return loss, components

    @staticmethod
    def backward(ctx, grad_output, _grad_components):
        refuse_double_backward(ctx.plan.name)
        inputs = ctx.saved_tensors
        with _no_autocast(inputs[0].device):
            _, _, grads = _run_chunks(ctx.plan, ctx.plan.wants, grad_output.reshape(-1),
                                      *inputs)
        return (None, *(None if g is None else g[0].view(g[1]) for g in grads))


def linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    temperature: float = 1.0,
    alpha: float | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: float | torch.Tensor | None = None,
    chunk_size: int | None = None,
    return_components: bool = False,
) -> torch.Tensor | KDLossComponents:
    """KD loss straight from hidden states and lm_head weights, without N x V logits.

    Equal to this PyTorch, with the logits computed chunk by chunk and never stored whole::

        def logits(hidden, weight, bias, scale, softcap):
            z = scale * F.linear(hidden.float(), weight.float(), bias)
            return z if softcap is None else softcap * torch.tanh(z / softcap)

        z_s = logits(student_hidden, student_weight, student_bias, student_logit_scale,
                     student_softcap)
        z_t = logits(teacher_hidden, teacher_weight, teacher_bias, teacher_logit_scale,
                     teacher_softcap)
        loss = fastkd.kd_loss(z_s, z_t, labels, temperature=temperature, alpha=alpha,
                              divergence=divergence, ...)   # every other option alike

    Args:
        student_hidden, teacher_hidden: (..., H_s) and (..., H_t) hidden states with the same
            leading shape (the widths may differ).
        student_weight, teacher_weight: (V, H_s) and (V, H_t) lm_head weights of the same V
            (a padded teacher vocabulary: pass ``teacher_weight[:V]``, a view). A DTensor (FSDP2)
            is gathered once per call.
        labels: (...) class ids, or None for pure distillation (alpha must then be 1).
        student_bias, teacher_bias: optional (V,) biases.
        student_logit_scale, teacher_logit_scale: > 0, multiply the logits before the softcap.
        student_softcap, teacher_softcap: None or c > 0: z -> c * tanh(z / c) (Gemma).
        temperature, alpha, divergence, beta, skew, label_smoothing, z_loss, ignore_index,
        reduction, normalizer, return_components: as in :func:`fastkd.kd_loss`.
        chunk_size: rows per chunk; None picks :func:`default_chunk_size` (a cap on chunk * V).

    Gradients reach every input that requires grad (the teacher's tensors only if they do), and
    are computed in the forward; the backward runs once per forward.
    """
    device = student_hidden.device if isinstance(student_hidden, torch.Tensor) else None
    autocast = device is not None and _autocast_dtype(device) is not None
    _check_head("student", student_hidden, student_weight, student_bias, autocast)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias, autocast)
    leading_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != leading_shape:
        raise ValueError(
            "student_hidden and teacher_hidden must have the same leading shape, got "
            f"{tuple(leading_shape)} and {tuple(teacher_hidden.shape[:-1])}"
        )
    if teacher_hidden.device != device:
        raise ValueError(f"teacher_hidden must be on student_hidden's device {device}, got "
                         f"{teacher_hidden.device}")
    vocab, teacher_vocab = student_weight.shape[0], teacher_weight.shape[0]
    if teacher_vocab != vocab:
        hint = (f"; if the teacher's vocabulary is only padded, pass teacher_weight[:{vocab}] "
                "(a view, no copy)" if teacher_vocab > vocab else "")
        raise ValueError(f"student_weight and teacher_weight must have the same vocabulary "
                         f"size, got {vocab} and {teacher_vocab}{hint}")
    _check_bias("student", student_weight, student_bias, autocast)
    _check_bias("teacher", teacher_weight, teacher_bias, autocast)
    check_labels(labels, leading_shape, device)
    options = check_loss_options(
        temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
        label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
        reduction=reduction, has_labels=labels is not None)
    normalizer = check_normalizer(normalizer, reduction, device)
    scales = (_check_scale("student_logit_scale", student_logit_scale),
              _check_scale("teacher_logit_scale", teacher_logit_scale))
    softcaps = (_check_softcap("student_softcap", student_softcap),
                _check_softcap("teacher_softcap", teacher_softcap))
    _check_chunk_size(chunk_size)
    if not isinstance(return_components, bool):
        raise TypeError(f"return_components must be a bool, got "
                        f"{type(return_components).__name__}")
    n_rows = math.prod(leading_shape)
    chunk = (default_chunk_size(n_rows, vocab, device) if chunk_size is None
             else min(chunk_size, max(n_rows, 1)))

    s_dtype, t_dtype = student_hidden.dtype, teacher_hidden.dtype
    student_weight, student_bias = (_full_tensor(student_weight, s_dtype),
                                    _full_tensor(student_bias, s_dtype))
    teacher_weight, teacher_bias = (_full_tensor(teacher_weight, t_dtype),
                                    _full_tensor(teacher_bias, t_dtype))
    inputs = (student_hidden.reshape(n_rows, student_hidden.shape[-1]), student_weight,
              student_bias, teacher_hidden.reshape(n_rows, teacher_hidden.shape[-1]),
              teacher_weight, teacher_bias,
              labels.reshape(n_rows) if labels is not None else None)
    cast_dtype = _autocast_dtype(device)
    present = [t for t in inputs[:6] if t is not None]
    grad_enabled = torch.is_grad_enabled()
    plan = LinearPlan(
        options=options, normalizer=normalizer, leading_shape=leading_shape, vocab=vocab,
        chunk=chunk, scales=scales, softcaps=softcaps, cast_dtype=cast_dtype,
        compute_dtype=torch.float32 if cast_dtype is not None else _ops.loss_dtype(*present),
        wants=tuple(grad_enabled and t is not None and t.requires_grad for t in inputs[:6]),
    )
    refuse_function_transforms(*present)
    with _no_autocast(device):
        if not any(plan.wants):
            loss, components, _ = _run_chunks(plan, plan.wants, None, *inputs)
        elif reduction == "none":
            loss, components = _RecomputedRows.apply(plan, *inputs)
        else:
            loss, components = SavedGradientLoss.apply(_run_saved, plan, *inputs)
    if return_components:
        return make_components(loss, components)
    return loss


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


class LinearKDLoss(torch.nn.Module):
    """:func:`linear_kd_loss` as a module: the options at construction, the tensors in forward.

    Example::

        criterion = fastkd.LinearKDLoss(temperature=2.0, alpha=0.5)
        loss = criterion(student_hidden, student.lm_head.weight, teacher_hidden,
                         teacher.lm_head.weight, labels)
    """

    def __init__(self, *, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                 teacher_softcap=None, temperature=1.0, alpha=None, divergence="forward_kl",
                 beta=0.5, skew=0.1, label_smoothing=0.0, z_loss=0.0, ignore_index=-100,
                 reduction="mean", chunk_size=None, return_components=False):
        super().__init__()
        self.options = dict(
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap,
            temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
            label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
            reduction=reduction, chunk_size=chunk_size, return_components=return_components,
        )
        # Fail at construction, not at the first training step.
        check_loss_options(
            temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
            label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
            reduction=reduction, has_labels=None)
        _check_scale("student_logit_scale", student_logit_scale)
        _check_scale("teacher_logit_scale", teacher_logit_scale)
        _check_softcap("student_softcap", student_softcap)
        _check_softcap("teacher_softcap", teacher_softcap)
        _check_chunk_size(chunk_size)

    def forward(self, student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None,
                student_bias=None, teacher_bias=None, normalizer=None):
        return linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                              labels, student_bias=student_bias, teacher_bias=teacher_bias,
                              normalizer=normalizer, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
