"""fastkd.hf model helpers on tiny random models of each logit convention (offline)."""

import pytest
import torch

pytest.importorskip("transformers")

from hf_models import SEQ, VOCAB, build  # noqa: E402

import fastkd.hf as fhf  # noqa: E402

ARCHS = ("gpt2", "llama", "gemma2", "gemma3", "cohere", "granite", "hyperclovax")


@pytest.fixture(scope="module")
def models():
    return {arch: build(arch) for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_scale_and_softcap_from_config_reproduce_the_models_logits(models, arch):
    model, expected = models[arch]
    # Gemma: softcap; Cohere: logit_scale multiplies; Granite: logits_scaling divides;
    # HyperCLOVA X: logits_scaling multiplies.
    assert fhf.logit_postprocessing(model.config) == pytest.approx(expected)
    head = fhf.lm_head(model)
    assert head.weight is model.get_output_embeddings().weight
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        hidden = fhf.last_hidden_state(model, input_ids=ids)
        ours = fhf.head_logits(head, hidden)
    assert hidden.shape == (2, SEQ, model.config.get_text_config().hidden_size)
    torch.testing.assert_close(ours, logits, rtol=1e-6, atol=1e-6)
    fhf.verify_lm_head(model)


@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_verify_lm_head_refuses_the_wrong_post_processing(models, arch):
    model, (scale, softcap) = models[arch]
    head = fhf.lm_head(model)
    with pytest.raises(ValueError, match="does not compute its logits"):
        fhf.verify_lm_head(model, head._replace(logit_scale=scale * 1.1))
    with pytest.raises(ValueError, match="does not compute its logits"):
        fhf.verify_lm_head(model, head._replace(softcap=None if softcap else 0.5))
    # An explicit override equal to the config's value passes.
    fhf.verify_lm_head(model, fhf.lm_head(model, (scale, softcap)))


def test_config_rules_without_a_model():
    class Text:
        model_type = "minicpm3"
        logits_scaling = 8.0
        final_logit_softcapping = None

    class Multimodal:  # a VLM: the fields live on its text config
        def get_text_config(self, decoder=None):
            return Text()

    assert fhf.logit_postprocessing(Multimodal()) == (0.125, None)
    Text.model_type = "hyperclovax"
    assert fhf.logit_postprocessing(Text()) == (8.0, None)

    class Glimmer:
        logit_scale = None  # None means not set: the next field is read
        output_multiplier = 0.5
        final_logit_softcapping = 30.0

    assert fhf.logit_postprocessing(Glimmer()) == (0.5, 30.0)

    class Bad:
        logit_scale = "inv_sqrt_d_model"

    with pytest.raises(ValueError, match="logit_scale must be a finite number"):
        fhf.logit_postprocessing(Bad())
    Bad.logit_scale, Bad.final_logit_softcapping = None, 0.0
    with pytest.raises(ValueError, match="final_logit_softcapping must be > 0"):
        fhf.logit_postprocessing(Bad())


def test_peft_lora_on_the_backbone_is_accepted_and_its_layers_run():
    peft = pytest.importorskip("peft")
    model, _ = build("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    fhf.check_peft(lora)
    ids = torch.arange(SEQ)[None] % VOCAB
    with torch.no_grad():
        hidden = fhf.last_hidden_state(lora, input_ids=ids)
        fhf.verify_lm_head(lora)
        with lora.disable_adapter():
            plain = fhf.last_hidden_state(lora, input_ids=ids)
    # The adapters (non-zero at init here) change the hidden state: they ran.
    assert (hidden - plain).abs().max() > 1e-4


def test_peft_adapter_on_lm_head_is_refused():
    peft = pytest.importorskip("peft")
    model, _ = build("llama")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(ValueError, match="adapter is applied to the output embedding"):
        fhf.check_peft(lora)
    with pytest.raises(ValueError, match="adapter is applied to the output embedding"):
        fhf.lm_head(lora)


def test_peft_modules_to_save_head_gives_the_trained_copy():
    peft = pytest.importorskip("peft")
    model, _ = build("llama")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                         modules_to_save=["lm_head"]))
    fhf.check_peft(wrapped)
    head = wrapped.get_base_model().get_output_embeddings()
    weight = fhf.lm_head(wrapped).weight
    assert weight is head.modules_to_save[head.active_adapters[0]].weight
    assert weight.requires_grad and not head.original_module.weight.requires_grad
    fhf.verify_lm_head(wrapped)


def test_peft_prompt_tuning_is_refused():
    peft = pytest.importorskip("peft")
    model, _ = build("llama")
    tuned = peft.get_peft_model(model, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                               num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt learning"):
        fhf.check_peft(tuned)


def test_helpers_import_without_transformers_imported():
    import subprocess
    import sys

    code = ("import sys, fastkd.hf; assert 'transformers' not in sys.modules, 'loaded'; "
            "print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.strip() == "ok", result.stderr


def test_a_vlm_that_ignores_its_text_configs_softcap_is_caught():
    # transformers 5.24's Gemma3ForConditionalGeneration does not apply the text config's
    # final_logit_softcapping: the config rule alone would distil against other logits.
    import transformers
    from hf_models import _common

    text = transformers.Gemma3TextConfig(**_common(32, 2, VOCAB), final_logit_softcapping=0.5)
    vision = transformers.SiglipVisionConfig(hidden_size=16, intermediate_size=32,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4, image_token_index=VOCAB - 1,
                                       boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config)
    assert fhf.logit_postprocessing(model.config) == (1.0, 0.5)  # read via get_text_config
    assert type(fhf.backbone(model)).__name__ == "Gemma3Model"  # the multimodal body
    applies_softcap = "final_logit_softcapping" in type(model).forward.__code__.co_names
    if applies_softcap:  # a transformers that applies it: the rule holds
        fhf.verify_lm_head(model)
    else:
        with pytest.raises(ValueError, match="does not compute its logits"):
            fhf.verify_lm_head(model)
        fhf.verify_lm_head(model, fhf.lm_head(model, (1.0, None)))
