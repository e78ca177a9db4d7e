"""``KDTrainer``: a ``transformers.Trainer`` that distils a teacher into the student with fastkd.

Per micro-batch r of an optimiser step, with the step's label tokens counted over every
micro-batch (and every process when ``average_tokens_across_devices``, the default), N:

    S_r  = sum over the counted positions of alpha*T^2*D(p_t || p_s) + (1-alpha)*CE + ...
    loss_r = S_r / (N / W)                         W = number of data-parallel processes

``training_step`` backpropagates loss_r as is (``loss_is_scaled_for_ga``: no division by the
accumulation steps); DDP and FSDP average the gradients over the W processes, so the step's
gradient is d(sum_r S_r)/dtheta / N: the gradient of the mean over all N tokens, as for one large
batch on one process. The divisor N / W is passed to the loss as ``normalizer`` and folded into
the gradient the loss writes, so ``backward`` runs with grad_output = 1 and never rescales the
gradient. The logged ``loss`` (the Trainer's mean over processes of sum_r loss_r) is the step's
mean per-token loss.

Labels follow the Hugging Face convention: position i predicts label i+1. Shifted labels are
``labels[..., 1:]`` padded with ``ignore_index`` (the last position predicts nothing), or a
collator's ``shift_labels`` as given; hidden states and logits keep their full length.
"""

from __future__ import annotations

import torch
import transformers

import fastkd
from fastkd._spec import check_loss_options

from . import config as hf_config

__all__ = ["KDTrainer", "run_as_forward", "shifted_labels"]

LABEL_KEYS = ("labels", "shift_labels")
# Keys the Trainer or a collator may put in a batch that are not backbone inputs.
# A stored teacher's batch keys (fastkd.offline.TopKCollator): used with teacher_model=None.
TEACHER_TOPK_KEYS = ("teacher_topk_ids", "teacher_topk_values", "teacher_tail_logprob")
NOT_MODEL_INPUTS = (*LABEL_KEYS, *TEACHER_TOPK_KEYS, "num_items_in_batch", "return_loss")
# Logged names of fastkd.KDLossComponents' divergence, ce and lse_squared.
COMPONENTS = ("kd_divergence", "kd_ce", "kd_lse_squared")


def run_as_forward(wrapper: torch.nn.Module, inner: torch.nn.Module, fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` as if it were ``inner.forward``, through ``wrapper``'s call.

    ``wrapper`` is what wraps ``inner`` (DDP, an FSDP2 module, accelerate's wrappers; ``inner``
    itself when nothing does). Its hooks run around ``fn`` as around a forward: DDP prepares the
    gradient reduction, FSDP2 gathers the root's parameters (so ``lm_head.weight`` is a plain
    tensor inside ``fn``) and reshards afterwards. ``inner.forward`` is swapped for the duration
    of that one call and restored before ``fn`` runs.
    """
    had_own = "forward" in inner.__dict__
    own = inner.__dict__.get("forward")

    def restore():
        if had_own:
            inner.forward = own
        else:
            inner.__dict__.pop("forward", None)

    def forward(*_args, **_kwargs):
        restore()
        return fn(*_args, **_kwargs)

    inner.forward = forward
    try:
        return wrapper(*args, **kwargs)
    finally:
        restore()


def shifted_labels(inputs, ignore_index: int = -100) -> torch.Tensor | None:
    """Next-token targets aligned with the positions: the batch's ``shift_labels`` if it has
    them, else ``fastkd.shift_labels(labels)`` (``labels[..., 1:]`` then one ``ignore_index``).
    None without either."""
    if inputs.get("shift_labels") is not None:
        return inputs["shift_labels"]
    labels = inputs.get("labels")
    if labels is None:
        return None
    return fastkd.shift_labels(labels, ignore_index)


def _gathered(head: hf_config.LMHead) -> hf_config.LMHead:
    """The student's head with whole tensors for the explicit-logits path.

    A head that FSDP2 shards as its own unit is a DTensor inside the student's forward (its own
    forward never runs). It is gathered as ``fastkd.linear_kd_loss`` gathers it: the gradient of
    the whole tensor is declared a per-rank partial average, so backward reduce-scatters it to
    the shards as FSDP2 does every other gradient. The fused path gets the DTensors as they are.
    """

    def whole(tensor):
        if tensor is None or not hasattr(tensor, "full_tensor"):  # not a DTensor
            return tensor
        from fastkd.linear import _full_tensor

        return _full_tensor(tensor, tensor.dtype)

    return head._replace(weight=whole(head.weight), bias=whole(head.bias))


def _teacher_head(head: hf_config.LMHead, vocab: int) -> hf_config.LMHead:
    """The teacher's head, gathered if sharded, cut to the student's ``vocab`` rows, detached
    (the teacher gets no gradient)."""

    def whole(tensor):
        if tensor is None:
            return None
        full_tensor = getattr(tensor, "full_tensor", None)
        tensor = full_tensor() if full_tensor is not None else tensor
        return tensor[:vocab].detach()

    return head._replace(weight=whole(head.weight), bias=whole(head.bias))


def _stored_teacher(inputs, leading_shape):
    """(ids, values, tail log-prob or None) of a stored top-k teacher's batch."""
    missing = [key for key in TEACHER_TOPK_KEYS[:2] if key not in inputs]
    if missing:
        raise ValueError(
            f"teacher_model=None trains from a stored top-k teacher: the batch needs {missing} "
            "(fastkd.offline.TopKCollator; keep them with remove_unused_columns=False or "
            "KDTrainer's signature columns)"
        )
    ids, values = inputs["teacher_topk_ids"], inputs["teacher_topk_values"]
    if ids.shape[:-1] != leading_shape:
        raise ValueError(
            f"teacher_topk_ids must be (*labels.shape, k) = ({tuple(leading_shape)}, k), got "
            f"{tuple(ids.shape)}"
        )
    return ids, values, inputs.get("teacher_tail_logprob")


class KDTrainer(transformers.Trainer):
    """``transformers.Trainer`` whose loss distils ``teacher_model`` into ``model`` with fastkd.

    The loss per counted position (``fastkd.kd_loss``'s, on the models' logits)::

        z_s = softcap_s(scale_s * (h_s @ W_s.T + b_s))   # student logits, likewise z_t
        loss_i = alpha * T**2 * D(softmax(z_t / T) || softmax(z_s / T))
                 + (1 - alpha) * CE(z_s, y_{i+1}) + z_loss * logsumexp(z_s)**2

    normalised by the step's number of label tokens (see the module docstring). With
    ``fused_linear=True`` it is ``fastkd.linear_kd_loss`` on the backbones' last hidden states and
    the heads' weights, and the (B, L, V) logits never exist; with False both models' logits are
    computed and passed to ``fastkd.kd_loss``. Both give the same loss and gradient.

    Args:
        model: the student, a causal LM (``PreTrainedModel`` or a PEFT model with adapters on its
            backbone).
        teacher_model: the teacher, run without gradients in eval mode on the student's device.
            It may differ in width, depth and dtype; its vocabulary must cover the student's (a
            larger, padded one is cut to the student's size). None: train from a stored top-k
            teacher (``fastkd.offline``): every batch carries ``teacher_topk_ids``,
            ``teacher_topk_values`` and, for ``tail="bucket"``, ``teacher_tail_logprob``, at the
            positions of the student's logits, and the loss is ``fastkd.topk_kd_loss`` (or
            ``linear_topk_kd_loss`` with ``fused_linear``); the divergence is forward KL.
        args: ``TrainingArguments``. ``label_smoothing_factor`` must stay 0 (use
            ``label_smoothing``).
        temperature, alpha, divergence, beta, skew, label_smoothing, z_loss, ignore_index: the
            loss options, as in ``fastkd.kd_loss``.
        fused_linear: project inside the loss (``fastkd.linear_kd_loss``) instead of materialising
            the logits.
        chunk_size: rows per chunk of the fused-linear loss (None: its default).
        student_logit_postprocessing, teacher_logit_postprocessing: (scale, softcap) overriding
            what ``fastkd.hf.logit_postprocessing`` reads from the model's config.
        verify_lm_head: run each model once on a few tokens at construction and raise if its
            logits are not ``softcap(scale * lm_head(h))`` with the values used
            (``fastkd.hf.verify_lm_head``).
        tail: how a stored top-k teacher's remaining mass is read (teacher_model=None only):
            "renormalize" or "bucket", as in ``fastkd.topk_kd_loss``.
        **kwargs: the rest of ``transformers.Trainer``'s arguments (train_dataset, ...), except
            ``compute_loss_func``.

    Logs ``kd_divergence`` and ``kd_ce`` (and ``kd_lse_squared`` with z_loss) beside ``loss``,
    averaged the same way.
    """

    # compute_loss normalises by the step's token count: the Trainer must not divide again.
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model=None,
        teacher_model=None,
        args=None,
        *,
        temperature: float = 1.0,
        alpha: float = 0.5,
        divergence: str = "forward_kl",
        beta: float = 0.5,
        skew: float = 0.1,
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        ignore_index: int = -100,
        fused_linear: bool = True,
        chunk_size: int | None = None,
        student_logit_postprocessing: tuple[float, float | None] | None = None,
        teacher_logit_postprocessing: tuple[float, float | None] | None = None,
        verify_lm_head: bool = True,
        tail: str = "renormalize",
        **kwargs,
    ):
        if not hasattr(transformers.Trainer, "_get_num_items_in_batch"):
            raise ImportError(
                f"fastkd.hf.KDTrainer needs a transformers whose Trainer counts the step's label "
                f"tokens in _get_num_items_in_batch (5.x); found {transformers.__version__}"
            )
        if model is None:
            raise ValueError("KDTrainer needs model (the student)")
        if teacher_model is None and divergence != "forward_kl":
            raise ValueError(
                "teacher_model=None trains from a stored top-k teacher (fastkd.topk_kd_loss), "
                f"whose divergence is forward KL; got divergence={divergence!r}"
            )
        if tail not in ("renormalize", "bucket"):
            raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}")
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError("KDTrainer computes the loss itself: do not pass compute_loss_func")
        if not isinstance(fused_linear, bool):
            raise TypeError(f"fused_linear must be a bool, got {fused_linear!r}")
        if args is not None and getattr(args, "label_smoothing_factor", 0.0):
            raise ValueError(
                "TrainingArguments.label_smoothing_factor would be ignored by KDTrainer's loss: "
                "pass label_smoothing= to KDTrainer instead"
            )
        if fused_linear and not hasattr(fastkd, "linear_kd_loss"):
            raise ValueError("this fastkd version has no linear_kd_loss: use fused_linear=False")
        hf_config.check_peft(model)
        if teacher_model is not None:
            hf_config.check_peft(teacher_model)
        options = check_loss_options(
            temperature=temperature, alpha=alpha, divergence=divergence, beta=beta, skew=skew,
            label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index,
            has_labels=True,
        )
        self.loss_options = dict(
            temperature=options.temperature, alpha=options.alpha, divergence=options.divergence,
            beta=options.beta, skew=options.skew, label_smoothing=options.label_smoothing,
            z_loss=options.z_loss, ignore_index=options.ignore_index,
        )
        self.ignore_index = options.ignore_index
        self.tail = tail
        self.fused_linear = fused_linear
        self.chunk_size = chunk_size
        self._postprocessing = {"student": student_logit_postprocessing,
                                "teacher": teacher_logit_postprocessing}
        super().__init__(model=model, args=args, **kwargs)
        # Transformers versions without loss_is_scaled_for_ga decide the division by the
        # accumulation steps from this flag alone; the Trainer's compute_loss, the only other
        # reader, is overridden here.
        self.model_accepts_loss_kwargs = True
        if self.args.n_gpu > 1:
            raise ValueError(
                "KDTrainer does not support torch.nn.DataParallel (several GPUs in one process); "
                "launch one process per GPU (torchrun / accelerate launch)"
            )
        student_head = hf_config.lm_head(model, student_logit_postprocessing)
        if verify_lm_head:
            hf_config.verify_lm_head(model, student_head)
        self.teacher_model = None
        if teacher_model is not None:
            if getattr(teacher_model, "hf_device_map", None) is None:
                teacher_model = teacher_model.to(self.args.device)
            self.teacher_model = teacher_model.eval()
            teacher_head = hf_config.lm_head(teacher_model, teacher_logit_postprocessing)
            if teacher_head.weight.shape[0] < student_head.weight.shape[0]:
                raise ValueError(
                    f"the teacher's vocabulary ({teacher_head.weight.shape[0]}) is smaller than "
                    f"the student's ({student_head.weight.shape[0]}): they must share one "
                    "vocabulary"
                )
            if verify_lm_head:
                hf_config.verify_lm_head(teacher_model, teacher_head)
        # Detached component sums since the last log, per mode, and eval batches counted.
        self._component_sums = {"train": None, "eval": None}
        self._component_counts = {"train": 0, "eval": 0}
        self._kd_last_logged_step = 0
        self._kd_eval_prefix = "eval"

    # ------------------------------------------------------------------ the loss

    def _loss(self, student_hidden, student_head, teacher_hidden, teacher_head, labels,
              normalizer, fused: bool):
        """The one call into fastkd's losses: (loss, detached components tensor (3,))."""
        options = dict(self.loss_options)
        sum_or_mean = dict(reduction="mean") if normalizer is None else dict(
            reduction="sum", normalizer=normalizer)
        vocab = student_head.weight.shape[0]
        teacher_head = _teacher_head(teacher_head, vocab)
        if fused:
            loss_fn = fastkd.linear_kd_loss
            inputs = (student_hidden, student_head.weight, teacher_hidden, teacher_head.weight,
                      labels)
            options.update(
                student_bias=student_head.bias, teacher_bias=teacher_head.bias,
                student_logit_scale=student_head.logit_scale,
                teacher_logit_scale=teacher_head.logit_scale,
                student_softcap=student_head.softcap, teacher_softcap=teacher_head.softcap,
            )
            if self.chunk_size is not None:
                options["chunk_size"] = self.chunk_size
        else:
            loss_fn = fastkd.kd_loss
            student_logits = hf_config.head_logits(_gathered(student_head), student_hidden)
            with torch.no_grad():
                teacher_logits = hf_config.head_logits(teacher_head, teacher_hidden)
            inputs = (student_logits, teacher_logits, labels)
        result = loss_fn(*inputs, return_components=True, **options, **sum_or_mean)
        components = torch.stack([result.divergence, result.ce, result.lse_squared])
        return result.loss, components.detach()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The distillation loss of one micro-batch, normalised by ``num_items_in_batch``.

        ``num_items_in_batch`` is the step's count of label tokens (the Trainer's, as computed by
        this class over the shifted labels); None normalises by this micro-batch's own count.
        Returns ``(loss, None)`` with ``return_outputs`` (no logits are computed).
        """
        labels = shifted_labels(inputs, self.ignore_index)
        if labels is None:
            raise ValueError(
                "KDTrainer needs 'labels' (or 'shift_labels') in every batch: they mark the "
                f"positions that count ({self.ignore_index} = ignored), also with alpha=1"
            )
        model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
        ids = model_inputs.get("input_ids")
        if ids is not None and labels.shape != ids.shape:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(ids.shape)}, got "
                f"{tuple(labels.shape)}"
            )
        normalizer = None
        if num_items_in_batch is not None:
            normalizer = torch.as_tensor(num_items_in_batch, device=labels.device)
            normalizer = normalizer.to(torch.float32).clamp(min=1.0)
            if self.args.average_tokens_across_devices:
                # The count covers every process, whose gradients DDP / FSDP average.
                normalizer = normalizer / self.accelerator.num_processes
        inner_student = self.accelerator.unwrap_model(model)
        if self.teacher_model is None:
            stored = _stored_teacher(inputs, labels.shape)
            with self.accelerator.autocast():
                loss, components = run_as_forward(
                    model, inner_student, self._student_topk_loss, inner_student, model_inputs,
                    labels, stored, normalizer,
                )
            return self._keep_components(model, loss, components, normalizer, return_outputs)
        teacher = self.teacher_model
        if teacher.training:
            teacher.eval()
        inner_teacher = self.accelerator.unwrap_model(teacher)
        with self.accelerator.autocast():
            with torch.no_grad():
                teacher_hidden = run_as_forward(teacher, inner_teacher, hf_config.last_hidden_state,
                                                inner_teacher, **model_inputs)
            teacher_head = hf_config.lm_head(inner_teacher, self._postprocessing["teacher"])
            loss, components = run_as_forward(
                model, inner_student, self._student_loss, inner_student, model_inputs, labels,
                teacher_hidden, teacher_head, normalizer,
            )
        return self._keep_components(model, loss, components, normalizer, return_outputs)

    def _keep_components(self, model, loss, components, normalizer, return_outputs):
        mode = "train" if model.training else "eval"
        if normalizer is not None and self.args.average_tokens_across_devices:
            components = components * self.accelerator.num_processes
        sums = self._component_sums[mode]
        self._component_sums[mode] = components if sums is None else sums + components
        if mode == "eval":
            self._component_counts[mode] += 1
        return (loss, None) if return_outputs else loss

    def _student_topk_loss(self, student, model_inputs, labels, stored, normalizer):
        """The loss against a stored top-k teacher (teacher_model=None), as the student
        wrapper's forward."""
        hidden = hf_config.last_hidden_state(student, **model_inputs)
        head = hf_config.lm_head(student, self._postprocessing["student"])
        ids, values, tail_logprob = stored
        options = {k: v for k, v in self.loss_options.items()
                   if k not in ("divergence", "beta", "skew")}
        options.update(tail=self.tail, return_components=True,
                       teacher_tail_logprob=tail_logprob if self.tail == "bucket" else None)
        options.update(dict(reduction="mean") if normalizer is None
                       else dict(reduction="sum", normalizer=normalizer))
        if self.fused_linear:
            if self.chunk_size is not None:
                options["chunk_size"] = self.chunk_size
            head = _gathered(head)
            result = fastkd.linear_topk_kd_loss(
                hidden, head.weight, ids, values, labels, student_bias=head.bias,
                student_logit_scale=head.logit_scale, student_softcap=head.softcap, **options)
        else:
            logits = hf_config.head_logits(_gathered(head), hidden)
            result = fastkd.topk_kd_loss(logits, ids, values, labels, **options)
        components = torch.stack([result.divergence, result.ce, result.lse_squared])
        return result.loss, components.detach()

    def _student_loss(self, student, model_inputs, labels, teacher_hidden, teacher_head,
                      normalizer):
        # Runs as the student wrapper's forward (run_as_forward): parameters gathered, hooks set.
        hidden = hf_config.last_hidden_state(student, **model_inputs)
        head = hf_config.lm_head(student, self._postprocessing["student"])
        return self._loss(hidden, head, teacher_hidden, teacher_head, labels, normalizer,
                          fused=self.fused_linear)

    # ------------------------------------------------------------------ Trainer plumbing

    def _get_num_items_in_batch(self, batch_samples, device):
        """Label tokens of the step (shifted labels != ignore_index), summed over the
        micro-batches and, with ``average_tokens_across_devices``, over the processes."""
        counts = []
        for batch in batch_samples:
            labels = shifted_labels(batch, self.ignore_index)
            if labels is None:
                return None
            counts.append((labels != self.ignore_index).sum())
        if not counts:
            return None
        total = torch.stack(counts).sum().to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return total

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        for key in ("shift_labels", *TEACHER_TOPK_KEYS):
            if key not in self._signature_columns:
                self._signature_columns.append(key)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Eval loss of a batch (normalised by its own label tokens, across processes); the
        student's logits only if predictions are asked for."""
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad():
            num_items = self._get_num_items_in_batch([inputs], self.args.device)
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, num_items_in_batch=num_items)
            loss = loss.detach()
            if prediction_loss_only:
                return loss, None, None
            model_inputs = {k: v for k, v in inputs.items() if k not in NOT_MODEL_INPUTS}
            logits = model(**model_inputs).logits
        return loss, logits, labels

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Components are gathered like the Trainer's loss: mean over processes, per optimiser
        # step for training, per batch for evaluation. Both logs run on every process.
        if "loss" in logs and self._component_sums["train"] is not None:
            steps = self.state.global_step - self._kd_last_logged_step
            self._kd_last_logged_step = self.state.global_step
            self._add_components(logs, "train", "", max(steps, 1))
        prefix = self._kd_eval_prefix
        if f"{prefix}_loss" in logs and self._component_sums["eval"] is not None:
            count = self._component_counts["eval"]
            self._add_components(logs, "eval", f"{prefix}_", max(count, 1))
        super().log(logs, *args, **kwargs)

    def _add_components(self, logs, mode: str, prefix: str, divisor: int) -> None:
        sums = self._component_sums[mode]
        self._component_sums[mode] = None
        self._component_counts[mode] = 0
        gathered = self.accelerator.gather(sums[None]).mean(0) / divisor
        values = gathered.tolist()
        names = COMPONENTS if self.loss_options["z_loss"] else COMPONENTS[:2]
        for name, value in zip(names, values, strict=False):
            logs[f"{prefix}{name}"] = value

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test"):
        self._component_sums["eval"] = None
        self._component_counts["eval"] = 0
        output = super().predict(test_dataset, ignore_keys, metric_key_prefix)
        if self._component_sums["eval"] is not None:  # predict() logs nothing: add them here
            self._add_components(output.metrics, "eval", f"{metric_key_prefix}_",
                                 max(self._component_counts["eval"], 1))
        return output

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        self._kd_eval_prefix = metric_key_prefix
        self._component_sums["eval"] = None
        self._component_counts["eval"] = 0
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
