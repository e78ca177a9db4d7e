"""Tiny randomly initialised causal LMs for the fastkd.hf tests (built from configs, offline)."""

from __future__ import annotations

import torch

VOCAB, HIDDEN, LAYERS, SEQ = 100, 32, 2, 16


def _common(hidden: int, layers: int, vocab: int) -> dict:
    return dict(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, head_dim=hidden // 2,
    )


def build(arch: str, *, seed: int = 0, hidden: int = HIDDEN, layers: int = LAYERS,
          vocab: int = VOCAB, **overrides):
    """A tiny `arch` causal LM: (model, expected (scale, softcap) of its logits)."""
    import transformers

    torch.manual_seed(seed)
    common = _common(hidden, layers, vocab)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab, n_positions=64, n_embd=hidden, n_layer=layers, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2,
        )
        cls, expected = transformers.GPT2LMHeadModel, (1.0, None)
    elif arch == "llama":
        config = transformers.LlamaConfig(**common)
        cls, expected = transformers.LlamaForCausalLM, (1.0, None)
    elif arch == "gemma2":
        # A cap near the logits' size, so that a wrong cap shows in the logits.
        config = transformers.Gemma2Config(**common, final_logit_softcapping=0.5)
        cls, expected = transformers.Gemma2ForCausalLM, (1.0, 0.5)
    elif arch == "gemma3":
        config = transformers.Gemma3TextConfig(**common, final_logit_softcapping=0.7)
        cls, expected = transformers.Gemma3ForCausalLM, (1.0, 0.7)
    elif arch == "cohere":
        config = transformers.CohereConfig(**common, logit_scale=3.0)
        cls, expected = transformers.CohereForCausalLM, (3.0, None)
    elif arch == "granite":
        config = transformers.GraniteConfig(**common, logits_scaling=4.0)
        cls, expected = transformers.GraniteForCausalLM, (0.25, None)
    elif arch == "hyperclovax":
        config = transformers.HyperCLOVAXConfig(**common, logits_scaling=2.5)
        cls, expected = transformers.HyperCLOVAXForCausalLM, (2.5, None)
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = cls(config)
    # Random init gives logits of ~0.1; larger head weights make scales and caps visible.
    with torch.no_grad():
        head = model.get_output_embeddings()
        if head.weight is not model.get_input_embeddings().weight:
            head.weight.mul_(20.0)
    return model, expected


def token_batches(count: int, batch_size: int = 2, *, seed: int = 0, vocab: int = VOCAB,
                  seq: int = SEQ):
    """Rows of (input_ids, labels) with padding (-100 labels, attention 0) at some rows' ends."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count * batch_size):
        ids = torch.randint(3, vocab, (seq,), generator=gen)
        labels = ids.clone()
        mask = torch.ones(seq, dtype=torch.long)
        pad = int(torch.randint(0, seq // 2, (1,), generator=gen)) if i % 3 == 0 else 0
        if pad:
            labels[-pad:] = -100
            mask[-pad:] = 0
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows
