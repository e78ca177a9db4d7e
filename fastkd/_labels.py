"""Label helpers for causal language models."""

from __future__ import annotations

import torch

from ._spec import check_labels, check_loss_options

__all__ = ["shift_labels"]


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Labels for next-token prediction on full-length logits: position i gets label i + 1.

    A causal LM's logits at position i predict token i + 1. Instead of slicing the logits
    (``logits[:, :-1]`` and ``labels[:, 1:]``, whose backward makes autograd allocate a
    zero-filled full-size gradient and copy the sliced one into it), keep the logits whole and
    shift the labels; the last position, which predicts nothing, gets ignore_index::

        shifted = torch.full_like(labels, ignore_index)
        shifted[..., :-1] = labels[..., 1:]

    so ``fastkd.kd_loss(s, t, shift_labels(y))`` with s, t of shape (B, L, V) is the loss of
    ``fastkd.kd_loss(s[:, :-1], t[:, :-1], y[:, 1:])``, and the gradient of the first L - 1
    positions is the same; the last position's gradient is 0. "none" keeps the last position
    (its loss is 0), and "batchmean" of 1-D labels (L,) divides by L instead of L - 1. Labels
    that are already ignore_index stay ignored, so padding and packed-sequence boundaries marked
    with it keep working.

    Args:
        labels: (..., L) integer class ids, e.g. (B, L) or (L,); only labels are touched, never
            the logits.
        ignore_index: the value for the last position; the loss's ignore_index.

    Returns:
        A new tensor of the labels' shape, dtype and device.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    check_labels(labels, labels.shape, labels.device)
    check_loss_options(ignore_index=ignore_index, has_labels=True)
    if labels.dim() < 1:
        raise ValueError("labels must have shape (..., sequence_length), got a 0-d tensor")
    limits = torch.iinfo(labels.dtype)
    if not limits.min <= ignore_index <= limits.max:
        raise ValueError(
            f"ignore_index must be representable in the labels' dtype {labels.dtype} "
            f"([{limits.min}, {limits.max}]), got {ignore_index}"
        )
    shifted = torch.full_like(labels, ignore_index, memory_format=torch.contiguous_format)
    shifted[..., :-1] = labels[..., 1:]
    return shifted
