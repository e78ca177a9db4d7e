"""The README's integration recipes on tiny randomly initialised GPT-2 models (no downloads)."""

import pytest
import torch

import fastkd
from fastkd import reference

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 97, 12


def _tiny_gpt2(n_layer, n_embd, seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=n_embd, n_layer=n_layer, n_head=2,
        # No dropout: the recipes are compared with the reference on the same forward.
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)


def _batches(count, batch_size=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(count):
        input_ids = torch.randint(0, VOCAB, (batch_size, SEQ), generator=gen)
        labels = input_ids.clone()
        labels[0, -3:] = -100  # padding at the end of the first sequence
        yield {"input_ids": input_ids, "labels": labels}


def _plain_loop(loss_fn, steps=3):
    """The README's plain-PyTorch recipe; returns the per-step losses."""
    teacher = _tiny_gpt2(2, 32, seed=1).eval()
    student = _tiny_gpt2(1, 16, seed=2)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    losses = []
    for batch in _batches(steps):
        with torch.no_grad():
            teacher_logits = teacher(batch["input_ids"]).logits
        student_logits = student(batch["input_ids"]).logits
        loss = loss_fn(student_logits, teacher_logits, fastkd.shift_labels(batch["labels"]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def test_plain_loop_recipe_follows_the_reference_step_by_step():
    fused = _plain_loop(fastkd.KDLoss(temperature=2.0, alpha=0.5))
    expected = _plain_loop(
        lambda s, t, y: reference.kd_loss(s, t, y, temperature=2.0, alpha=0.5)
    )
    # Three SGD steps apart, any gradient difference would have moved the later losses.
    assert fused == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert fused[-1] < fused[0]


class DistillTrainer(transformers.Trainer):
    """The README's Trainer recipe, verbatim."""

    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        self.kd = fastkd.KDLoss(temperature=2.0, alpha=0.5)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        loss = self.kd(outputs.logits, teacher_logits, fastkd.shift_labels(labels))
        return (loss, outputs) if return_outputs else loss


def test_trainer_recipe_trains_and_matches_the_reference(tmp_path):
    pytest.importorskip("accelerate")
    teacher = _tiny_gpt2(2, 32, seed=1)
    student = _tiny_gpt2(1, 16, seed=2)
    dataset = [
        {"input_ids": ids, "labels": labels}
        for batch in _batches(4, batch_size=1)
        for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
    )
    trainer = DistillTrainer(model=student, args=args, train_dataset=dataset, teacher=teacher)

    probe = next(_batches(1, seed=5))
    loss = trainer.compute_loss(student, dict(probe))
    with torch.no_grad():
        teacher_logits = teacher(probe["input_ids"]).logits
    student_logits = student(probe["input_ids"]).logits
    expected = reference.kd_loss(student_logits[:, :-1], teacher_logits[:, :-1],
                                 probe["labels"][:, 1:], temperature=2.0, alpha=0.5)
    torch.testing.assert_close(loss, expected)

    result = trainer.train()
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 3 and len(logged) == 3
    assert all(torch.isfinite(torch.tensor(logged)))
