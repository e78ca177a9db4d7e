"""fastkd.linear_kd_loss against float64 on explicit logits, and its integration behaviour.

The float64 truth projects both models in float64 autograd and takes dloss/dlogits from the
closed forms of tests/helpers.py, so neither the fused loss nor fastkd.reference is trusted.
"""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda
from helpers import (
    assert_close,
    family_truth,
    float64_truth,
    make_labels,
    random_grad_output,
    tolerance,
)

import fastkd
from fastkd.kernels.kd_loss import MAX_ON_CHIP_V
from fastkd.linear import default_chunk_size

IGNORE = -100
# The interpreter evaluates masked-off lanes too (-inf - -inf, log 0 there); kernels discard them.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

LOSS_OPTIONS = ("temperature", "alpha", "reduction", "divergence", "beta", "skew",
                "label_smoothing", "z_loss", "normalizer")
NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
         "teacher_bias")


def make_case(*, lead=(12,), h_s=16, h_t=24, vocab=300, dtype=torch.float32, bias=(True, False),
              seed=0, ignore_rows=(3,), labels=True, teacher_grad=False):
    """Leaf tensors (hidden, weight, bias per model) and labels; logits of a few units."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    tensors = [
        randn(*lead, h_s), randn(vocab, h_s, std=h_s**-0.5 * 2), randn(vocab) if bias[0] else None,
        randn(*lead, h_t), randn(vocab, h_t, std=h_t**-0.5 * 2), randn(vocab) if bias[1] else None,
    ]
    for i, tensor in enumerate(tensors):
        if tensor is not None:
            tensor.requires_grad_(i < 3 or teacher_grad)
    y = make_labels(lead, vocab, seed=seed, ignore_rows=ignore_rows) if labels else None
    return tensors, y


def project64(hidden, weight, bias, scale, softcap):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def truth(tensors, labels, *, scales=(1.0, 1.0), softcaps=(None, None), grad_output=None,
          **options):
    """float64 loss, gradients of every tensor that requires grad, and the components."""
    leaves = [None if t is None else t.detach().double().requires_grad_(t.requires_grad)
              for t in tensors]
    z_s = project64(*leaves[:3], scales[0], softcaps[0])
    z_t = project64(*leaves[3:], scales[1], softcaps[1])
    result = float64_truth(z_s.detach(), z_t.detach(), labels, grad_output=grad_output,
                           **options)
    outputs = [z_s] + ([z_t] if z_t.requires_grad else [])
    grads = [result.grad_student] + ([result.grad_teacher] if z_t.requires_grad else [])
    torch.autograd.backward(outputs, grads)
    components = result.components
    if components is None:  # the closed-form path gives none: the family truth does
        components = family_truth(z_s.detach(), z_t.detach(), labels, **options).components
    return result.loss, [None if t is None else t.grad for t in leaves], components


def run(tensors, labels, *, grad_output=None, components=False, **kwargs):
    """(loss, gradients), and the components as a third item when asked for."""
    for t in tensors:
        if t is not None:
            t.grad = None
    result = fastkd.linear_kd_loss(*tensors[:2], *tensors[3:5], labels, student_bias=tensors[2],
                                   teacher_bias=tensors[5], return_components=components,
                                   **kwargs)
    loss = result.loss if components else result
    if grad_output is not None:
        loss.backward(grad_output.to(loss.dtype))
    elif any(t is not None and t.requires_grad for t in tensors):
        loss.backward()
    grads = [None if t is None else t.grad for t in tensors]
    if components:
        return loss.detach(), grads, (result.divergence, result.ce, result.lse_squared)
    return loss.detach(), grads


def check(tensors, labels, backend_name, *, grad_output=None, what="", **kwargs):
    """fastkd's loss and every gradient within the helpers' tolerance of the float64 truth."""
    loss_options = {k: kwargs[k] for k in LOSS_OPTIONS if k in kwargs}
    scales = (kwargs.get("student_logit_scale", 1.0), kwargs.get("teacher_logit_scale", 1.0))
    softcaps = (kwargs.get("student_softcap"), kwargs.get("teacher_softcap"))
    loss64, grads64, components64 = truth(tensors, labels, scales=scales, softcaps=softcaps,
                                          grad_output=grad_output, ignore_index=IGNORE,
                                          **loss_options)
    loss, grads, components = run(tensors, labels, grad_output=grad_output, components=True,
                                  **kwargs)
    dtype = tensors[0].dtype
    loss_tol = tolerance(dtype, "loss", backend_name)
    assert_close(loss, loss64, loss_tol, what=f"{what} loss",
                 record=f"linear {backend_name} {dtype} loss", scale_floor=1.0)
    for name, part, part64 in zip(("divergence", "ce", "lse_squared"), components,
                                  components64, strict=True):
        assert not part.requires_grad
        assert_close(part, part64, loss_tol, what=f"{what} {name}", scale_floor=1.0)
    for name, tensor, grad, grad64 in zip(NAMES, tensors, grads, grads64, strict=True):
        if tensor is None or not tensor.requires_grad:
            assert grad is None, f"{what}: {name} got a gradient it did not ask for"
            continue
        assert grad is not None and grad.dtype == tensor.dtype, f"{what}: {name} gradient"
        assert_close(grad, grad64, tolerance(tensor.dtype, "grad", backend_name),
                     what=f"{what} {name} grad", record=f"linear {backend_name} {dtype} {name}")
    return loss


@pytest.fixture
def backend_name(backend, monkeypatch):
    import os

    return os.environ["FASTKD_BACKEND"]


# Sampled corners: chunk sizes dividing N or not, one chunk, N = 1, scale and softcap on either
# side, biases on and off, fp32 and bf16, a (B, L, H) leading shape, every reduction, a random
# grad_output, mutual distillation.
CASES = {
    "mean_T2_chunk5": dict(case=dict(), kw=dict(temperature=2.0, alpha=0.5, chunk_size=5)),
    "sum_chunk4_divides": dict(case=dict(bias=(False, True)),
                               kw=dict(reduction="sum", chunk_size=4, alpha=0.3),
                               grad_output=True),
    "one_row": dict(case=dict(lead=(1,), ignore_rows=()), kw=dict(temperature=0.7, chunk_size=3)),
    "no_rows_sum": dict(case=dict(lead=(0,), ignore_rows=()), kw=dict(reduction="sum")),
    "student_softcap_scale": dict(
        case=dict(lead=(2, 5)),
        kw=dict(student_softcap=3.0, student_logit_scale=1.7, temperature=2.0, chunk_size=3)),
    "teacher_softcap_scale_mutual": dict(
        case=dict(bias=(True, True), teacher_grad=True),
        kw=dict(teacher_softcap=2.5, teacher_logit_scale=0.6, temperature=1.5, chunk_size=7)),
    "both_softcap_none_reduction": dict(
        case=dict(lead=(2, 3, 2), teacher_grad=True),
        kw=dict(reduction="none", student_softcap=4.0, teacher_softcap=6.0, chunk_size=5,
                alpha=0.6), grad_output=True),
    "bf16_batchmean": dict(case=dict(dtype=torch.bfloat16, lead=(3, 4)),
                           kw=dict(reduction="batchmean", temperature=2.0, chunk_size=5)),
    "bf16_softcap_mutual": dict(
        case=dict(dtype=torch.bfloat16, teacher_grad=True, bias=(True, True)),
        kw=dict(student_softcap=5.0, teacher_logit_scale=2.0, chunk_size=8)),
    "no_labels_default_chunk": dict(case=dict(labels=False, lead=(24,)),
                                    kw=dict(temperature=3.0)),
    "float64": dict(case=dict(dtype=torch.float64, lead=(7,)),
                    kw=dict(temperature=2.0, chunk_size=2, student_softcap=2.0)),
    # The divergence family and the CE options, each once, spread over the corners above.
    "reverse_kl_mutual": dict(case=dict(teacher_grad=True),
                              kw=dict(divergence="reverse_kl", temperature=2.0, chunk_size=5)),
    "jsd_softcap_smoothing": dict(
        case=dict(lead=(2, 5), bias=(True, True)),
        kw=dict(divergence="jsd", beta=0.3, label_smoothing=0.1, student_softcap=4.0,
                chunk_size=3)),
    "tvd_z_loss_sum_normalizer": dict(
        case=dict(), kw=dict(divergence="tvd", z_loss=1e-2, reduction="sum", normalizer=7.5,
                             chunk_size=5), grad_output=True),
    "skew_kl_bf16": dict(case=dict(dtype=torch.bfloat16),
                         kw=dict(divergence="skew_kl", skew=0.2, temperature=2.0, chunk_size=7)),
    "skew_reverse_kl_none_mutual": dict(
        case=dict(teacher_grad=True, lead=(3, 3)),
        kw=dict(divergence="skew_reverse_kl", reduction="none", teacher_softcap=3.0,
                chunk_size=4), grad_output=True),
    "jsd_beta1_is_reverse_kl": dict(case=dict(labels=False),
                                    kw=dict(divergence="jsd", beta=1.0, chunk_size=5)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_float64(backend_name, name):
    spec = CASES[name]
    tensors, labels = make_case(**spec["case"])
    grad_output = None
    if spec.get("grad_output"):
        shape = tensors[0].shape[:-1] if spec["kw"].get("reduction") == "none" else ()
        grad_output = random_grad_output(shape, torch.Generator().manual_seed(1))
    check(tensors, labels, backend_name, grad_output=grad_output, what=name, **spec["kw"])


def test_vocabulary_past_the_on_chip_limit(backend_name):
    """V just over MAX_ON_CHIP_V takes the kernel's two-sweep path; few rows keep it fast."""
    tensors, labels = make_case(lead=(3,), h_s=8, h_t=8, vocab=MAX_ON_CHIP_V + 5,
                                ignore_rows=(1,), bias=(True, True))
    check(tensors, labels, backend_name, temperature=2.0, alpha=0.5, chunk_size=2,
          student_softcap=4.0, what="long rows")


def test_ignored_rows_and_all_rows_ignored(backend_name):
    tensors, labels = make_case(lead=(9,), ignore_rows=(0, 4, 8))
    check(tensors, labels, backend_name, temperature=2.0, chunk_size=4, what="some ignored")
    labels = torch.full_like(labels, IGNORE)
    loss = check(tensors, labels, backend_name, temperature=2.0, chunk_size=4, what="all ignored")
    assert loss.item() == 0.0
    assert all(t.grad is None or not t.grad.any() for t in tensors if t is not None)


def test_no_grad_computes_the_loss_only(backend_name):
    tensors, labels = make_case()
    with_grad, _ = run(tensors, labels, temperature=2.0, chunk_size=5)
    for t in tensors:
        if t is not None:
            t.grad = None
    with torch.no_grad():
        loss = fastkd.linear_kd_loss(*tensors[:2], *tensors[3:5], labels,
                                     student_bias=tensors[2], temperature=2.0, chunk_size=5)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, with_grad, rtol=0, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_runs_once_and_refuses_create_graph(reduction):
    tensors, labels = make_case()
    loss = fastkd.linear_kd_loss(*tensors[:2], *tensors[3:5], labels, chunk_size=5,
                                 reduction=reduction).sum()
    loss.backward(retain_graph=True)
    if reduction != "none":  # "none" recomputes in backward: a second one is just as right
        with pytest.raises(RuntimeError, match="only once"):
            loss.backward()
    loss = fastkd.linear_kd_loss(*tensors[:2], *tensors[3:5], labels, chunk_size=5,
                                 reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, tensors[0], create_graph=True)


def test_default_chunk_size_is_a_budget_on_chunk_times_vocab():
    assert default_chunk_size(10**6, 32000, torch.device("cpu")) == 128
    assert default_chunk_size(10**6, 151936, torch.device("cuda")) == 832
    assert default_chunk_size(5, 32000, torch.device("cpu")) == 5
    assert default_chunk_size(10**6, 10**9, torch.device("cpu")) == 1


def test_autocast_projects_in_the_autocast_dtype(backend_name):
    """Under autocast the GEMMs take bf16-rounded inputs; the logits stay fp32."""
    tensors, labels = make_case(bias=(True, True))
    rounded = [None if t is None else t.detach().to(torch.bfloat16).to(torch.float32)
               .requires_grad_(t.requires_grad) for t in tensors]
    loss64, grads64, _ = truth(rounded, labels, temperature=2.0, ignore_index=IGNORE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = run(tensors, labels, temperature=2.0, chunk_size=5)
    assert loss.dtype == torch.float32
    assert_close(loss, loss64, tolerance(torch.float32, "loss", backend_name), what="loss",
                 scale_floor=1.0)
    for name, grad, grad64 in zip(NAMES[:3], grads[:3], grads64[:3], strict=True):
        assert grad.dtype == torch.float32
        assert_close(grad, grad64, tolerance(torch.float32, "grad", backend_name), what=name)


class _Body(torch.nn.Module):
    """A tiny 'model': token embedding, one hidden layer, an lm_head (optionally tied)."""

    def __init__(self, vocab, hidden, tied, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.layer = torch.nn.Linear(hidden, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=not tied)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, tokens):
        return torch.tanh(self.layer(self.embed(tokens)))


def _model_inputs(vocab=300, hidden=16, lead=(2, 6), seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, lead, generator=gen)
    teacher_hidden = torch.randn(*lead, 24, generator=gen)
    teacher_weight = torch.randn(vocab, 24, generator=gen) * 0.4
    labels = make_labels(lead, vocab, seed=seed, ignore_rows=(0, 5))
    return tokens, teacher_hidden, teacher_weight, labels


def _model_grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("checkpointing", [None, "reentrant", "non_reentrant"])
def test_model_step_equals_explicit_logits(backend_name, tied, checkpointing):
    """A model step: tied embeddings get both gradients, gradient checkpointing recomputes."""
    model = _Body(300, 16, tied).double()
    tokens, teacher_hidden, teacher_weight, labels = (
        t.double() if t.is_floating_point() else t for t in _model_inputs())
    options = dict(temperature=2.0, alpha=0.5)

    def fused(embedded):
        # Shifted as in causal LM training: non-contiguous slices of hidden states and labels.
        head = model.lm_head
        hidden = torch.tanh(model.layer(embedded))
        return fastkd.linear_kd_loss(hidden[:, :-1], head.weight, teacher_hidden[:, :-1],
                                     teacher_weight, labels[:, 1:], student_bias=head.bias,
                                     chunk_size=4, **options)

    embedded = model.embed(tokens)
    if checkpointing is None:
        loss = fused(embedded)
    else:
        from torch.utils.checkpoint import checkpoint

        # The loss inside the checkpointed region: its forward runs again in backward.
        loss = checkpoint(fused, embedded, use_reentrant=checkpointing == "reentrant")
    grads = _model_grads(model, loss)
    explicit = fastkd.reference.kd_loss(model.lm_head(model(tokens))[:, :-1],
                                        (teacher_hidden @ teacher_weight.T)[:, :-1],
                                        labels[:, 1:], **options)
    expected = _model_grads(model, explicit)
    assert_close(loss, explicit, tolerance(torch.float64, "loss", backend_name), what="loss",
                 scale_floor=1.0)
    assert grads.keys() == expected.keys()
    for name in grads:
        assert_close(grads[name], expected[name], tolerance(torch.float64, "grad", backend_name),
                     what=name)


# aot_eager traces the whole step (dynamo, then AOT autograd with the custom ops' mutations
# functionalised) in a few seconds; inductor adds C++ code generation (about 20 s on 2 cores) and
# runs once, for one chunk.
@pytest.mark.parametrize("backend_name,compiler,chunk_size,reduction", [
    ("torch", "aot_eager", 5, "mean"), ("triton", "aot_eager", 5, "mean"),
    ("torch", "aot_eager", 5, "none"), ("torch", "inductor", None, "mean")])
def test_torch_compile_fullgraph(monkeypatch, backend_name, compiler, chunk_size, reduction):
    monkeypatch.setenv("FASTKD_BACKEND", backend_name)
    model = _Body(300, 16, tied=False)
    tokens, teacher_hidden, teacher_weight, labels = _model_inputs()
    row_weights = torch.linspace(0.5, 1.5, labels.numel()).view(labels.shape)

    def step(tokens, teacher_hidden, labels):
        head = model.lm_head
        result = fastkd.linear_kd_loss(model(tokens), head.weight, teacher_hidden,
                                       teacher_weight, labels, student_bias=head.bias,
                                       temperature=2.0, student_softcap=5.0,
                                       chunk_size=chunk_size, reduction=reduction,
                                       divergence="jsd", return_components=True)
        loss = result.loss if reduction != "none" else (result.loss * row_weights).sum()
        return loss, result.divergence

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss, divergence = compiled(tokens, teacher_hidden, labels)
    grads = _model_grads(model, loss)
    eager, eager_divergence = step(tokens, teacher_hidden, labels)
    expected = _model_grads(model, eager)
    torch.testing.assert_close(loss, eager.detach())
    torch.testing.assert_close(divergence, eager_divergence)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], msg=name)


def test_module_wraps_the_function(backend_name):
    tensors, labels = make_case(bias=(True, True))
    criterion = fastkd.LinearKDLoss(temperature=2.0, alpha=0.3, student_softcap=4.0,
                                    chunk_size=5)
    assert "student_softcap=4.0" in repr(criterion)
    loss = criterion(*tensors[:2], *tensors[3:5], labels, student_bias=tensors[2],
                     teacher_bias=tensors[5])
    expected, _ = run(tensors, labels, temperature=2.0, alpha=0.3, student_softcap=4.0,
                      chunk_size=5)
    torch.testing.assert_close(loss.detach(), expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Bad input


def _bad(**changes):
    tensors, labels = make_case(bias=(True, True))
    args = dict(zip(NAMES, tensors, strict=True), labels=labels)
    args.update(changes)
    return args


def _call(args, **kwargs):
    return fastkd.linear_kd_loss(args["student_hidden"], args["student_weight"],
                                 args["teacher_hidden"], args["teacher_weight"], args["labels"],
                                 student_bias=args["student_bias"],
                                 teacher_bias=args["teacher_bias"], **kwargs)


W_S, W_T = make_case()[0][1], make_case()[0][4]
BAD_INPUTS = {
    "vocab_mismatch_padded": (dict(teacher_weight=torch.randn(320, 24)), {}, ValueError,
                              r"300 and 320.*teacher_weight\[:300\]"),
    "vocab_mismatch_smaller": (dict(teacher_weight=torch.randn(299, 24)), {}, ValueError,
                               r"same vocabulary size, got 300 and 299$"),
    "hidden_width": (dict(student_hidden=torch.randn(12, 15)), {}, ValueError,
                     r"student_weight must have shape \(vocab, 15\)"),
    "weight_not_2d": (dict(teacher_weight=torch.randn(300, 24, 1)), {}, ValueError,
                      "teacher_weight must have shape"),
    "leading_shapes": (dict(teacher_hidden=torch.randn(11, 24)), {}, ValueError,
                       "same leading shape"),
    "labels_shape": (dict(labels=torch.zeros(11, dtype=torch.long)), {}, ValueError,
                     "labels must have"),
    "float_labels": (dict(labels=torch.zeros(12)), {}, TypeError, "labels must be an integer"),
    "dtype_mismatch": (dict(student_hidden=torch.randn(12, 16, dtype=torch.bfloat16)), {},
                       TypeError, r"student_hidden \(torch.bfloat16\) and student_weight"),
    "bias_dtype": (dict(teacher_bias=torch.randn(300, dtype=torch.float64)), {}, TypeError,
                   "teacher_bias"),
    "bias_shape": (dict(student_bias=torch.randn(299)), {}, ValueError,
                   r"student_bias must have shape \(300,\)"),
    "integer_hidden": (dict(student_hidden=torch.zeros(12, 16, dtype=torch.long)), {},
                       TypeError, "student_hidden must be a float"),
    "not_a_tensor": (dict(teacher_hidden=[1.0]), {}, TypeError, "teacher_hidden must be"),
    "hidden_on_meta": (dict(student_hidden=torch.empty(12, 16, device="meta")), {}, ValueError,
                       "student_hidden must be on student_weight's device"),
    "softcap_zero": ({}, dict(student_softcap=0.0), ValueError, "student_softcap must be"),
    "softcap_negative": ({}, dict(teacher_softcap=-1.0), ValueError, "teacher_softcap must be"),
    "softcap_tensor": ({}, dict(teacher_softcap=torch.tensor(2.0)), TypeError,
                       "teacher_softcap must be a Python float"),
    "scale_zero": ({}, dict(student_logit_scale=0.0), ValueError, "student_logit_scale"),
    "scale_nan": ({}, dict(teacher_logit_scale=float("nan")), ValueError, "teacher_logit_scale"),
    "chunk_zero": ({}, dict(chunk_size=0), ValueError, "chunk_size must be >= 1"),
    "chunk_float": ({}, dict(chunk_size=2.0), TypeError, "chunk_size must be an int"),
    "temperature": ({}, dict(temperature=0.0), ValueError, "temperature must lie in"),
    "reduction": ({}, dict(reduction="avg"), ValueError, "reduction must be one of"),
    "alpha_without_labels": (dict(labels=None), dict(alpha=0.5), ValueError, "needs labels"),
    "normalizer_with_mean": ({}, dict(normalizer=3.0), ValueError, "reduction='sum'"),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_names_the_argument(name):
    changes, kwargs, error, match = BAD_INPUTS[name]
    with pytest.raises(error, match=match):
        _call(_bad(**changes), **kwargs)


def test_module_checks_options_at_construction():
    with pytest.raises(ValueError, match="student_softcap"):
        fastkd.LinearKDLoss(student_softcap=-2.0)
    with pytest.raises(ValueError, match="temperature"):
        fastkd.LinearKDLoss(temperature=-1.0)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_half_gemms_match_float64(dtype):
    """On CUDA, bf16 projections run as half GEMMs with fp32 results (torch.mm out_dtype)."""
    tensors, labels = make_case(lead=(4, 33), h_s=64, h_t=48, vocab=MAX_ON_CHIP_V + 3,
                                dtype=dtype, bias=(True, True), teacher_grad=True)
    tensors = [None if t is None else t.detach().cuda().requires_grad_(t.requires_grad)
               for t in tensors]
    check(tensors, labels.cuda(), "triton", temperature=2.0, alpha=0.5, student_softcap=30.0,
          chunk_size=40, divergence="jsd", what=f"cuda {dtype}")
