"""fastkd.linear_kd_loss against the peers' fused-linear distillation losses on CPU.

- TRL's ``_chunked_divergence_loss`` (DistillationTrainer): generalised JSD over hidden states
  and lm_head weights, mean over the completion mask, temperature on both sides and no T^2, no
  CE term: fastkd at alpha = 1 divided by T^2.
- Liger's ``LigerFusedLinearJSDLoss``: weight_hard * CE + weight_soft * JSD(T), both over the
  non-ignored tokens: fastkd with weight_hard = 1 - alpha and weight_soft = alpha * T^2.

Both skip when the library is not installed (they are benchmark/test extras).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import make_labels

import fastkd

IGNORE = -100


def import_peer(name: str):
    """Import an optional peer library, or skip the test when it is not installed.

    Run from a checkout (the repository root on sys.path), transformers, which TRL imports, would
    take the checkout's top-level kernels/ folder for the Hugging Face `kernels` package and fail
    to import it; the root is left off sys.path while the peer loads (an installed fastkd has no
    top-level kernels package).
    """
    root = Path(fastkd.__file__).resolve().parent.parent
    if not (root / "setup.py").exists():  # an installed fastkd: nothing to hide
        return pytest.importorskip(name)
    saved = list(sys.path)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]
    try:
        return pytest.importorskip(name)
    finally:
        sys.path[:] = saved


def _inputs(*, lead=(2, 7), h_s=16, h_t=24, vocab=300, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = [
        torch.randn(*lead, h_s, generator=gen), torch.randn(vocab, h_s, generator=gen) * 0.5,
        torch.randn(vocab, generator=gen) if bias else None,
        torch.randn(*lead, h_t, generator=gen), torch.randn(vocab, h_t, generator=gen) * 0.4,
        torch.randn(vocab, generator=gen) if bias else None,
    ]
    for tensor in tensors[:3]:
        if tensor is not None:
            tensor.requires_grad_()
    labels = make_labels(lead, vocab, seed=seed, ignore_rows=(0, 1, 9))
    return tensors, labels


def _grads(loss, tensors):
    wanted = [t for t in tensors[:3] if t is not None]
    return torch.autograd.grad(loss, wanted)


def _divergence(beta):
    """fastkd's name for the generalised JSD at beta (0: forward KL, 1: reverse KL)."""
    if beta == 0.0:
        return {}
    return {"divergence": "reverse_kl"} if beta == 1.0 else {"divergence": "jsd", "beta": beta}


TRL_CASES = {
    "beta0_forward_kl_T2": dict(beta=0.0, temperature=2.0),
    "beta0_bias_scale_softcap": dict(beta=0.0, temperature=1.5, bias=True,
                                     student_logit_scale=0.8, teacher_logit_scale=1.25,
                                     student_softcap=4.0, teacher_softcap=3.0),
    "beta_half_jsd_softcap": dict(beta=0.5, temperature=2.0, student_softcap=3.0,
                                  teacher_logit_scale=0.7),
    "beta1_reverse_kl_bias_scale": dict(beta=1.0, temperature=1.0, bias=True,
                                        student_logit_scale=1.5, teacher_softcap=5.0),
}


@pytest.mark.parametrize("name", sorted(TRL_CASES))
def test_equals_trl_chunked_divergence(name):
    import_peer("trl.trainer.distillation_trainer")
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    case = dict(TRL_CASES[name])
    beta, temperature, bias = case.pop("beta"), case.pop("temperature"), case.pop("bias", False)
    tensors, labels = _inputs(bias=bias)
    s_h, s_w, s_b, t_h, t_w, t_b = tensors
    theirs, _, _ = _chunked_divergence_loss(
        s_h, t_h, s_w, t_w, labels != IGNORE, beta, student_lm_head_bias=s_b,
        teacher_lm_head_bias=t_b, temperature=temperature,
        student_logit_scale=case.get("student_logit_scale", 1.0),
        teacher_logit_scale=case.get("teacher_logit_scale", 1.0),
        student_final_logit_softcapping=case.get("student_softcap"),
        teacher_final_logit_softcapping=case.get("teacher_softcap"),
    )
    mine = fastkd.linear_kd_loss(s_h, s_w, t_h, t_w, labels, student_bias=s_b, teacher_bias=t_b,
                                 temperature=temperature, alpha=1.0, chunk_size=5,
                                 **_divergence(beta), **case) / temperature**2
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for mine_grad, their_grad in zip(_grads(mine, tensors), _grads(theirs, tensors),
                                     strict=True):
        torch.testing.assert_close(mine_grad, their_grad, rtol=1e-4, atol=1e-6)


LIGER_CASES = {
    "beta0_forward_kl_T2": dict(beta=0.0, temperature=2.0, alpha=0.5),
    "beta_half_jsd_bias_T1": dict(beta=0.5, temperature=1.0, alpha=0.3, bias=True),
    "beta1_reverse_kl_T3": dict(beta=1.0, temperature=3.0, alpha=0.8),
}


@pytest.mark.parametrize("name", sorted(LIGER_CASES))
def test_equals_liger_fused_linear_jsd(name):
    import_peer("liger_kernel.chunked_loss")
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    case = LIGER_CASES[name]
    beta, temperature, alpha = case["beta"], case["temperature"], case["alpha"]
    tensors, labels = _inputs(bias=case.get("bias", False))
    s_h, s_w, s_b, t_h, t_w, t_b = tensors
    hidden_s = s_h.reshape(-1, s_h.shape[-1])
    hidden_t = t_h.reshape(-1, t_h.shape[-1])
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=1.0 - alpha,
                                    weight_soft_loss=alpha * temperature**2, beta=beta,
                                    ignore_index=IGNORE, temperature=temperature, compiled=False,
                                    chunk_size=4)
    theirs = liger(hidden_s, s_w, hidden_t, t_w, labels.reshape(-1), s_b, t_b)
    mine = fastkd.linear_kd_loss(s_h, s_w, t_h, t_w, labels, student_bias=s_b, teacher_bias=t_b,
                                 temperature=temperature, alpha=alpha, chunk_size=5,
                                 **_divergence(beta))
    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    for mine_grad, their_grad in zip(_grads(mine, tensors), _grads(theirs, tensors),
                                     strict=True):
        torch.testing.assert_close(mine_grad, their_grad, rtol=1e-4, atol=1e-6)
