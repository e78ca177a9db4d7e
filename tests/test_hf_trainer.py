"""fastkd.hf.KDTrainer on tiny random causal LMs: the loss it logs and the update it makes,
against fastkd.reference on explicit shifted logits; gradient accumulation; fused vs logits."""

import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from hf_models import build, token_batches  # noqa: E402

import fastkd  # noqa: E402
import fastkd.hf as fhf  # noqa: E402
from fastkd import reference  # noqa: E402

HAS_LINEAR = hasattr(fastkd, "linear_kd_loss")
needs_linear = pytest.mark.skipif(
    not HAS_LINEAR, reason="fastkd.linear_kd_loss is not in this fastkd (fused_linear=True)")
FUSED = [pytest.param(True, marks=needs_linear, id="fused"), pytest.param(False, id="logits")]
KD = dict(temperature=2.0, alpha=0.6)
LR = 0.5


def make_args(tmp_path, batch_size, accumulation, steps=1, **extra):
    return transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=LR, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True, **extra,
    )


def one_step(tmp_path, student, teacher, rows, *, batch_size, accumulation, args=None, **kd):
    """One optimiser step of KDTrainer; returns (first logged loss and logs, parameter update)."""
    student = copy.deepcopy(student)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer = fhf.KDTrainer(
        model=student, teacher_model=teacher, train_dataset=rows, **{**KD, **kd},
        args=make_args(tmp_path, batch_size, accumulation, **(args or {})),
    )
    trainer.train()
    logs = next(entry for entry in trainer.state.log_history if "loss" in entry)
    update = {n: p.detach() - before[n] for n, p in student.named_parameters()}
    return logs, update


def reference_step(student, teacher, rows, **kd):
    """Loss of the whole batch (mean over its label tokens) and -LR * its gradient."""
    student = copy.deepcopy(student)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    student_logits = student(**inputs).logits
    labels = F.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    result = reference.kd_loss(student_logits, teacher_logits, labels, **{**KD, **kd},
                               return_components=True)
    result.loss.backward()
    reference_step.components = result
    return result.loss.detach(), {n: -LR * p.grad for n, p in student.named_parameters()}


def check_against_reference(logs, update, student, teacher, rows, rel=1e-6, rtol=1e-9, **kd):
    """The logged loss and the update equal fastkd.reference's; returns its components."""
    loss, expected = reference_step(student, teacher, rows, **kd)
    assert logs["loss"] == pytest.approx(float(loss), rel=rel)
    assert_updates_close(update, expected, rtol=rtol)
    return reference_step.components


def assert_updates_close(got, expected, rtol=1e-9):
    for name, value in expected.items():
        scale = value.abs().max().clamp(min=1e-8)
        err = (got[name] - value).abs().max() / scale
        assert err < rtol, (name, float(err))


@pytest.fixture(scope="module")
def pair():
    # float64, so that the comparisons see the normalisation, not the summation order. The
    # teacher is of another family and wider.
    teacher, _ = build("llama", seed=1, hidden=48, layers=2)
    student, _ = build("gpt2", seed=2, hidden=32, layers=2)
    return student.double(), teacher.double().eval()


@pytest.mark.parametrize("fused", FUSED)
def test_first_logged_loss_and_update_equal_the_reference_on_shifted_logits(tmp_path, pair,
                                                                            fused):
    student, teacher = pair
    rows = token_batches(2, batch_size=2, seed=3)
    logs, update = one_step(tmp_path, student, teacher, rows, batch_size=2, accumulation=2,
                            fused_linear=fused)
    check_against_reference(logs, update, student, teacher, rows)


@pytest.mark.parametrize("fused", FUSED)
def test_gradient_checkpointing_makes_the_same_update(tmp_path, pair, fused):
    # The backbone's layers recompute their activations in backward, inside the redirected
    # forward of the student.
    student, teacher = pair
    rows = token_batches(1, batch_size=2, seed=14)
    logs, update = one_step(tmp_path, student, teacher, rows, batch_size=2, accumulation=1,
                            fused_linear=fused, args=dict(gradient_checkpointing=True))
    check_against_reference(logs, update, student, teacher, rows)


def test_compute_loss_without_a_step_count_is_the_batch_mean(tmp_path, pair):
    student, teacher = pair
    rows = token_batches(1, batch_size=2, seed=15)
    trainer = fhf.KDTrainer(model=copy.deepcopy(student), teacher_model=teacher,
                            args=make_args(tmp_path, 2, 1), train_dataset=rows,
                            fused_linear=False, **KD)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    loss = trainer.compute_loss(trainer.model, batch)
    expected, _ = reference_step(student, teacher, rows)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="needs 'labels'"):
        trainer.compute_loss(trainer.model, {"input_ids": batch["input_ids"]})


def test_accumulation_over_uneven_micro_batches_equals_one_large_batch(tmp_path, pair):
    student, teacher = pair
    rows = token_batches(2, batch_size=2, seed=4)
    counts = [int((r["labels"][1:] != -100).sum()) for r in rows]
    assert len(set(counts)) > 1  # uneven micro-batches: a per-micro-batch mean would differ
    big_logs, big = one_step(tmp_path / "a", student, teacher, rows, batch_size=4,
                             accumulation=1, fused_linear=False)
    acc_logs, acc = one_step(tmp_path / "b", student, teacher, rows, batch_size=1,
                             accumulation=4, fused_linear=False)
    assert acc_logs["loss"] == pytest.approx(big_logs["loss"], rel=1e-5)
    assert_updates_close(acc, big)


@needs_linear
@pytest.mark.parametrize("arch", ["gemma2", "cohere", "granite"])
def test_fused_linear_agrees_with_explicit_logits(tmp_path, arch):
    # Softcap (Gemma-2), multiplying scale (Cohere), dividing scale (Granite) on both sides;
    # float64, so that the two paths must agree to float64 rounding.
    student, _ = build(arch, seed=5)
    teacher, _ = build(arch, seed=6, hidden=48)
    student, teacher = student.double(), teacher.double()
    rows = token_batches(1, batch_size=2, seed=7)
    logits_logs, logits_update = one_step(tmp_path / "l", student, teacher, rows, batch_size=2,
                                          accumulation=1, fused_linear=False)
    fused_logs, fused_update = one_step(tmp_path / "f", student, teacher, rows, batch_size=2,
                                        accumulation=1, fused_linear=True)
    assert fused_logs["loss"] == pytest.approx(logits_logs["loss"], rel=1e-6)
    assert_updates_close(fused_update, logits_update)
    check_against_reference(fused_logs, fused_update, student, teacher, rows)


@pytest.mark.parametrize("fused", FUSED)
def test_loss_options_pass_through_and_components_are_logged(tmp_path, pair, fused):
    student, teacher = pair
    rows = token_batches(2, batch_size=2, seed=12)
    options = dict(divergence="jsd", beta=0.3, label_smoothing=0.1, z_loss=1e-3, alpha=0.7)
    logs, update = one_step(tmp_path, student, teacher, rows, batch_size=2, accumulation=2,
                            fused_linear=fused, **options)
    parts = check_against_reference(logs, update, student, teacher, rows, **options)
    assert logs["kd_divergence"] == pytest.approx(float(parts.divergence), rel=1e-6)
    assert logs["kd_ce"] == pytest.approx(float(parts.ce), rel=1e-6)
    assert logs["kd_lse_squared"] == pytest.approx(float(parts.lse_squared), rel=1e-6)


@needs_linear
def test_a_bfloat16_teacher_gives_the_same_step_on_both_paths(tmp_path, pair):
    student, teacher = pair
    # Module.to converts in place: copies keep the shared float64 pair intact.
    student, teacher = copy.deepcopy(student).float(), copy.deepcopy(teacher).to(torch.bfloat16)
    rows = token_batches(1, batch_size=2, seed=13)
    runs = [one_step(tmp_path / str(fused), student, teacher, rows, batch_size=2, accumulation=1,
                     fused_linear=fused) for fused in (True, False)]
    (fused_logs, fused_update), (logits_logs, logits_update) = runs
    # The teacher's logits are rounded to bfloat16 on the explicit path only (the fused path
    # keeps them in float32): the updates differ by up to ~1e-2 of their size (measured 9e-3).
    assert fused_logs["loss"] == pytest.approx(logits_logs["loss"], rel=1e-2)
    assert_updates_close(fused_update, logits_update, rtol=2e-2)
    check_against_reference(logits_logs, logits_update, student, teacher, rows, rel=1e-5,
                            rtol=1e-3)


def test_collator_shift_labels_are_used_as_given(tmp_path, pair):
    student, teacher = pair
    rows = token_batches(1, batch_size=2, seed=8)
    # shift_labels that differ from labels[1:]: only they may decide the targets.
    shifted = []
    for row in rows:
        targets = torch.roll(row["input_ids"], -2)
        targets[-3:] = -100
        shifted.append({**row, "shift_labels": targets})
    logs, update = one_step(tmp_path, student, teacher, shifted, batch_size=2, accumulation=1,
                            fused_linear=False)
    # The reference on the same targets, given as unshifted labels.
    as_labels = [{**r, "labels": F.pad(r["shift_labels"][:-1], (1, 0), value=-100)}
                 for r in shifted]
    check_against_reference(logs, update, student, teacher, as_labels)


def test_eval_loss_and_components_are_logged(tmp_path, pair):
    student, teacher = pair
    rows = token_batches(1, batch_size=2, seed=9)
    trainer = fhf.KDTrainer(
        model=copy.deepcopy(student), teacher_model=teacher,
        args=make_args(tmp_path, 2, 1, per_device_eval_batch_size=2), train_dataset=rows,
        eval_dataset=rows, fused_linear=False, **KD,
    )
    metrics = trainer.evaluate()
    loss, _ = reference_step(student, teacher, rows)
    assert metrics["eval_loss"] == pytest.approx(float(loss), rel=1e-5)
    parts = reference_step.components
    assert metrics["eval_kd_divergence"] == pytest.approx(float(parts.divergence), rel=1e-6)
    assert metrics["eval_kd_ce"] == pytest.approx(float(parts.ce), rel=1e-6)
    # Predictions: the student's logits, beside the same loss.
    output = trainer.predict(rows)
    assert output.predictions.shape == (2, rows[0]["input_ids"].numel(),
                                        student.config.vocab_size)
    assert output.metrics["test_loss"] == pytest.approx(float(loss), rel=1e-6)
    assert output.metrics["test_kd_ce"] == pytest.approx(float(parts.ce), rel=1e-6)


def test_refusals(tmp_path, pair):
    student, teacher = pair
    rows = token_batches(1, batch_size=2)
    args = make_args(tmp_path, 2, 1)
    with pytest.raises(ValueError, match="compute_loss_func"):
        fhf.KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                      compute_loss_func=lambda *a, **k: 0.0, fused_linear=False)
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        fhf.KDTrainer(model=student, teacher_model=teacher,
                      args=make_args(tmp_path, 2, 1, label_smoothing_factor=0.1),
                      train_dataset=rows, fused_linear=False)
    with pytest.raises(ValueError, match="temperature"):
        fhf.KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=rows,
                      temperature=0.0, fused_linear=False)
    small_vocab, _ = build("llama", vocab=50)
    with pytest.raises(ValueError, match="vocabulary"):
        fhf.KDTrainer(model=student, teacher_model=small_vocab, args=args, train_dataset=rows,
                      fused_linear=False)
    peft = pytest.importorskip("peft")
    head_lora = peft.get_peft_model(build("llama")[0],
                                    peft.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="output embedding"):
        fhf.KDTrainer(model=head_lora, teacher_model=teacher, args=args, train_dataset=rows,
                      fused_linear=False)
    prompt = peft.get_peft_model(build("llama")[0], peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=4))
    with pytest.raises(ValueError, match="prompt learning"):
        fhf.KDTrainer(model=prompt, teacher_model=teacher, args=args, train_dataset=rows,
                      fused_linear=False)


def test_lora_student_trains_only_its_adapters(tmp_path, pair):
    peft = pytest.importorskip("peft")
    _, teacher = pair
    base, _ = build("llama", seed=10)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    before = {n: p.detach().clone() for n, p in lora.named_parameters()}
    rows = token_batches(1, batch_size=2, seed=11)
    trainer = fhf.KDTrainer(model=lora, teacher_model=teacher, args=make_args(tmp_path, 2, 1),
                            train_dataset=rows, fused_linear=False, **KD)
    trainer.train()
    moved = {n for n, p in lora.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)


def _with_stored_topk(rows, teacher, k, temperature):
    """rows + the teacher's top-k at each position (what fastkd.offline's collator yields)."""
    stored = []
    for row in rows:
        with torch.no_grad():
            logits = teacher(input_ids=row["input_ids"][None],
                             attention_mask=row["attention_mask"][None]).logits[0]
        ids, values, tail = fastkd.teacher_topk(logits, k, temperature=temperature,
                                                return_tail_logprob=True)
        stored.append({**row, "teacher_topk_ids": ids, "teacher_topk_values": values,
                       "teacher_tail_logprob": tail})
    return stored


@pytest.mark.parametrize("fused", FUSED)
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_stored_teacher_step_equals_topk_kd_loss(tmp_path, pair, fused, tail):
    """teacher_model=None: the loss and update of fastkd.topk_kd_loss on the stored entries."""
    student, teacher = pair
    rows = _with_stored_topk(token_batches(1, batch_size=2, seed=4), teacher, k=8,
                             temperature=KD["temperature"])
    logs, update = one_step(tmp_path, student, None, rows, batch_size=2, accumulation=1,
                            fused_linear=fused, tail=tail, verify_lm_head=False)
    reference_student = copy.deepcopy(student)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    logits = reference_student(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits
    loss = fastkd.topk_kd_loss(
        logits, batch["teacher_topk_ids"], batch["teacher_topk_values"],
        fastkd.shift_labels(batch["labels"]), tail=tail,
        teacher_tail_logprob=batch["teacher_tail_logprob"] if tail == "bucket" else None, **KD)
    loss.backward()
    assert logs["loss"] == pytest.approx(float(loss), rel=1e-6)
    assert_updates_close(update, {n: -LR * p.grad for n, p in
                                  reference_student.named_parameters()}, rtol=1e-9)


def test_stored_teacher_refusals(tmp_path, pair):
    student, _ = pair
    with pytest.raises(ValueError, match="whose divergence is forward KL"):
        fhf.KDTrainer(model=student, teacher_model=None, divergence="jsd",
                      args=make_args(tmp_path, 2, 1), train_dataset=[])
    rows = token_batches(1, batch_size=2, seed=4)
    trainer = fhf.KDTrainer(model=student, teacher_model=None, args=make_args(tmp_path, 2, 1),
                            train_dataset=rows, verify_lm_head=False, **KD)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    with pytest.raises(ValueError, match="stored top-k teacher"):
        trainer.compute_loss(student, batch)
