"""fastkd.hf: distillation of Hugging Face causal LMs with fastkd's losses.

``KDTrainer`` (a ``transformers.Trainer``) needs the ``hf`` extra (transformers, accelerate) and
imports transformers only when first accessed; the model helpers need only PyTorch.
"""

from .config import (
    LMHead,
    backbone,
    check_peft,
    head_logits,
    last_hidden_state,
    lm_head,
    logit_postprocessing,
    unwrap_peft,
    verify_lm_head,
)

__all__ = [
    "KDTrainer",
    "LMHead",
    "backbone",
    "check_peft",
    "head_logits",
    "last_hidden_state",
    "lm_head",
    "logit_postprocessing",
    "run_as_forward",
    "shifted_labels",
    "unwrap_peft",
    "verify_lm_head",
]

_TRAINER_NAMES = ("KDTrainer", "run_as_forward", "shifted_labels")


def __getattr__(name):
    if name in _TRAINER_NAMES:
        try:
            from . import trainer
        except ImportError as error:
            raise ImportError(
                f"fastkd.hf.{name} needs transformers and accelerate: pip install 'fastkd[hf]'"
            ) from error
        return getattr(trainer, name)
    raise AttributeError(f"module 'fastkd.hf' has no attribute {name!r}")
