"""What the fused loss needs from a Hugging Face causal LM: backbone output, head and logit rules.

A causal LM computes its logits as

    z = softcap(scale * (h @ W.T + b)),   softcap(x) = c * tanh(x / c)   (c = None: no cap)

from the backbone's last hidden state h (B, L, H), the output embedding ``lm_head`` (W of shape
(V, H), optional bias b) and two numbers read from the text config:

- scale: ``logit_scale`` (Cohere), ``output_multiplier`` (Muse Glimmer),
  ``lm_head_multiplier`` (Falcon-H1), else ``logits_scaling``, which Granite and MiniCPM3 divide
  by (scale = 1 / logits_scaling) and HyperCLOVA X multiplies by; 1.0 when none is set.
- c: ``final_logit_softcapping`` (Gemma 2/3, Muse Glimmer), applied after the scale.

These are the same logits as ``model(**inputs).logits``, so ``fastkd.linear_kd_loss`` on
(h, W, b, scale, c) is ``fastkd.kd_loss`` on the model's logits without ever storing them.

Config fields are a convention, not a contract: a few multimodal wrappers ignore a field their
text config carries, and some configs carry a field the model never reads. ``verify_lm_head``
runs the model once on a few tokens and compares, so that a model that does not follow the rule
above raises instead of being distilled against another objective. Only PyTorch is needed here;
the models are duck-typed (``config``, ``base_model``, ``get_output_embeddings``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "LMHead",
    "backbone",
    "check_peft",
    "head_logits",
    "last_hidden_state",
    "lm_head",
    "logit_postprocessing",
    "unwrap_peft",
    "verify_lm_head",
]

# Fields that multiply the logits, in the order they are looked up.
SCALE_FIELDS = ("logit_scale", "output_multiplier", "lm_head_multiplier")
# model_types whose `logits_scaling` multiplies the logits (every other model divides by it).
MULTIPLYING_LOGITS_SCALING = frozenset({"hyperclovax"})


class LMHead(NamedTuple):
    """The output projection and post-processing of one causal LM (``z = softcap(s*(hW^T+b))``)."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None  # (V,)
    logit_scale: float
    softcap: float | None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    if get is None:
        return config
    try:
        return get(decoder=True)
    except TypeError:  # configs from before the decoder= argument
        return get()


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(
            f"config.{name} must be a finite number to be applied to the logits, got {value!r}; "
            "pass the logit post-processing explicitly instead"
        )
    return float(value)


def logit_postprocessing(config) -> tuple[float, float | None]:
    """``(scale, softcap)`` of a model's logits, read from its text config (see module docs).

    ``config.get_text_config(decoder=True)`` is read, so a vision-language model gives its
    language model's fields. A field set to None counts as not set.
    """
    text = _text_config(config)
    scale = None
    for name in SCALE_FIELDS:
        value = getattr(text, name, None)
        if value is not None:
            scale = _real(name, value)
            break
    if scale is None:
        value = getattr(text, "logits_scaling", None)
        if value is not None:
            value = _real("logits_scaling", value)
            if getattr(text, "model_type", None) in MULTIPLYING_LOGITS_SCALING:
                scale = value
            else:
                if value == 0.0:
                    raise ValueError("config.logits_scaling divides the logits: it must not be 0")
                scale = 1.0 / value
    softcap = getattr(text, "final_logit_softcapping", None)
    if softcap is not None:
        softcap = _real("final_logit_softcapping", softcap)
        if softcap <= 0.0:
            raise ValueError(f"config.final_logit_softcapping must be > 0, got {softcap}")
    return (1.0 if scale is None else scale), softcap


def unwrap_peft(model):
    """The transformers model inside a PEFT ``PeftModel`` (the model itself otherwise)."""
    get_base_model = getattr(model, "get_base_model", None)
    if get_base_model is not None and hasattr(model, "peft_config"):
        return get_base_model()
    return model


def _is_adapter_layer(module) -> bool:
    # PEFT tuner layers (LoRA, IA3, ...) keep the wrapped layer as `base_layer`.
    return hasattr(module, "base_layer") and hasattr(module, "active_adapters")


def check_peft(model) -> None:
    """Refuse the PEFT set-ups the loss cannot honour (it reads the head and backbone directly).

    - An adapter on the output embedding: the loss projects with ``lm_head.weight``, so the
      adapter would be ignored and never trained.
    - Prompt learning (prompt/prefix/p-tuning): the virtual tokens are added by
      ``PeftModel.forward``, which the backbone call does not go through.

    LoRA (or any adapter) on the backbone's layers works: those layers run in the backbone.
    """
    for name, cfg in (getattr(model, "peft_config", None) or {}).items():
        if getattr(cfg, "is_prompt_learning", False):
            raise ValueError(
                f"PEFT adapter {name!r} is prompt learning ({type(cfg).__name__}): fastkd.hf runs "
                "the backbone directly and would skip its virtual tokens; use an adapter on the "
                "backbone's layers (e.g. LoRA) instead"
            )
    head = unwrap_peft(model).get_output_embeddings()
    if head is not None and _is_adapter_layer(head):
        raise ValueError(
            "a PEFT adapter is applied to the output embedding (lm_head): fastkd.hf reads "
            "lm_head.weight directly, so the adapter would be ignored and never trained; remove "
            "'lm_head' from target_modules (modules_to_save=['lm_head'] trains the head fully)"
        )


def backbone(model):
    """The module that returns the last hidden state (``base_model``: the text decoder of an LM,
    the multimodal body of a vision-language model)."""
    hf = unwrap_peft(model)
    body = getattr(hf, "base_model", None)
    if body is None or body is hf:
        # Older vision-language models set base_model_prefix = "" (base_model is the model).
        body = getattr(hf, "model", None)
    if body is None or body is hf:
        raise ValueError(
            f"{type(hf).__name__} has no backbone module separate from its head "
            "(base_model / model); fastkd.hf needs a causal LM with an lm_head"
        )
    return body


def last_hidden_state(model, **inputs) -> torch.Tensor:
    """(B, L, H) output of the backbone on ``inputs`` (input_ids, attention_mask, ...), no head.

    Under DDP/FSDP call it through the wrapper's forward (``fastkd.hf.trainer.run_as_forward``):
    calling it on the inner module skips the wrapper's hooks.
    """
    outputs = backbone(model)(**inputs, use_cache=False, return_dict=True)
    return outputs.last_hidden_state


def lm_head(model, postprocessing: tuple[float, float | None] | None = None) -> LMHead:
    """Weight, bias, logit scale and softcap of a causal LM's output layer.

    ``postprocessing`` = (scale, softcap) overrides what the config says.
    """
    hf = unwrap_peft(model)
    head = hf.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(hf).__name__}.get_output_embeddings() gives no linear head with a weight; "
            "fastkd.hf needs a causal LM"
        )
    if _is_adapter_layer(head):
        check_peft(model)
    if postprocessing is None:
        scale, softcap = logit_postprocessing(hf.config)
    else:
        scale, softcap = postprocessing
        scale = _real("logit scale", scale)
        softcap = None if softcap is None else _real("softcap", softcap)
    return LMHead(head.weight, getattr(head, "bias", None), scale, softcap)


def head_logits(head: LMHead, hidden: torch.Tensor) -> torch.Tensor:
    """The logits ``softcap(scale * (hidden @ W.T + b))`` as the model computes them."""
    logits = F.linear(hidden, head.weight, head.bias)
    if head.logit_scale != 1.0:
        logits = logits * head.logit_scale
    if head.softcap is not None:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    return logits


def verify_lm_head(model, head: LMHead | None = None, *, seq_len: int = 8,
                   rtol: float = 1e-3) -> LMHead:
    """Check ``head`` (default: ``lm_head(model)``) against the model's own logits; return it.

    Runs the model and its backbone once, in eval mode and without gradients, on ``seq_len``
    token ids, and raises ValueError if ``head_logits`` differs from ``model(...).logits`` by
    more than ``rtol`` times their largest magnitude (plus a dtype-sized absolute term).
    A softcap far above the logits' range changes them little, so on a freshly initialised model
    a wrong cap of that size can pass; a wrong scale cannot.
    """
    hf = unwrap_peft(model)
    head = lm_head(model) if head is None else head
    vocab = head.weight.shape[0]
    ids = (torch.arange(seq_len, device=head.weight.device) * 7 + 1) % vocab
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            expected = hf(input_ids=ids[None], use_cache=False, return_dict=True).logits
            hidden = last_hidden_state(model, input_ids=ids[None])
            got = head_logits(head, hidden.to(head.weight.dtype))
    finally:
        hf.train(was_training)
    expected = expected.float()
    got = got.float()
    if got.shape != expected.shape:
        raise ValueError(
            f"{type(hf).__name__}: logits from lm_head have shape {tuple(got.shape)}, the model's "
            f"{tuple(expected.shape)}"
        )
    tol = rtol * expected.abs().max() + 8 * torch.finfo(head.weight.dtype).eps
    err = (got - expected).abs().max()
    if not bool(err <= tol):  # a one-off check at set-up, not in the loss path
        raise ValueError(
            f"{type(hf).__name__} does not compute its logits as softcap(scale * lm_head(h)) with "
            f"scale={head.logit_scale}, softcap={head.softcap} read from its config (largest "
            f"difference {float(err):.3g}); pass the model's (scale, softcap) explicitly"
        )
    return head
