"""Token telemetry, Full-ECE statistics and the token_hard_bin term of the fused loss against an eager float64
computation that holds the full logits (docs/math.md#token-level-calibration), on every backend."""

import pytest
import torch
import torch.nn.functional as F

import calibkern
from calibkern import BinStats, fused_linear_calibration_loss
from calibkern.reference import bin_index
from helpers import skip_unsupported_dtype

BACKENDS = calibkern.available_backends()
M, IGNORE = 10, -100
SMOOTHED = {"label_smoothing": 0.2, "lse_square_scale": 1e-2}  # the statistics read softmax(z) back from G'
ACCURACY = torch.tensor([0.0, 0.05, 0.2, 0.3, 0.45, 0.5, 0.7, 0.75, 0.9, 1.0])


def make_batch(b=2, t=9, d=12, v=40, seed=0, scale=1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(b, t, d, generator=g) * scale).to(dtype)
    weight = torch.randn(v, d, generator=g).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[torch.rand(b, t, generator=g) < 0.3] = IGNORE
    labels[0, :2] = IGNORE
    return hidden, weight, bias, labels


def scatter(bins, weight, dtype):
    return torch.zeros(M, dtype=dtype).scatter_add_(0, bins.reshape(-1), weight.reshape(-1).to(dtype))


def oracle(hidden, weight, bias, labels, *, shift=True, bin_accuracy=None, lam=1.0, sft_weight=1.0,
           num_items_in_batch=None, logit_softcap=None, label_smoothing=0.0, lse_square_scale=0.0):
    """Float64 full logits: the loss (F.cross_entropy with ``label_smoothing`` plus the z-loss), and token and
    Full-ECE statistics as BinStats."""
    z = hidden.double() @ weight.double().t() + (0.0 if bias is None else bias.double())
    if logit_softcap is not None:
        z = torch.tanh(z / logit_softcap) * logit_softcap
    if shift:
        labels = F.pad(labels[..., 1:], (0, 1), value=IGNORE)
    z, labels = z.reshape(-1, z.shape[-1]), labels.reshape(-1)
    keep = labels != IGNORE
    z, y = z[keep], labels[keep]
    p = torch.softmax(z, 1)
    conf, pred = p.max(1).values, z.argmax(1)
    bins = bin_index(conf.detach(), M)
    token = BinStats(scatter(bins, torch.ones_like(bins), torch.int64), scatter(bins, conf.detach(), torch.float64),
                     scatter(bins, pred == y, torch.float64))
    full_bins = bin_index(p.detach(), M)
    is_label = F.one_hot(y, z.shape[1])
    full = BinStats(scatter(full_bins, torch.ones_like(full_bins), torch.int64),
                    scatter(full_bins, p.detach(), torch.float64), scatter(full_bins, is_label, torch.float64))
    n = num_items_in_batch if num_items_in_batch is not None else max(int(keep.sum()), 1)
    ce = (F.cross_entropy(z, y, reduction="sum", label_smoothing=label_smoothing)
          + lse_square_scale * z.logsumexp(1).square().sum()) / n
    cal = torch.zeros((), dtype=torch.float64)
    if bin_accuracy is not None:
        cal = ((conf - bin_accuracy.double()[bins]) ** 2).sum() / n
    return sft_weight * ce + lam * cal, ce, cal, token, full


def assert_stats_equal(got, want):
    assert torch.equal(got.counts, want.counts), (got.counts, want.counts)
    assert torch.equal(got.sum_correct, want.sum_correct)
    torch.testing.assert_close(got.sum_conf, want.sum_conf, atol=1e-5, rtol=1e-5)
    assert int(got.n_skipped) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 5, 1000])
def test_telemetry_matches_float64(backend, shift, chunk_size):
    hidden, weight, bias, labels = make_batch()
    out = fused_linear_calibration_loss(hidden, weight, labels, option_ids=None, bias=bias, calibration=None,
                                        shift=shift, chunk_size=chunk_size, backend=backend, token_stats=True,
                                        full_stats=True)
    _, ce, _, token, full = oracle(hidden, weight, bias, labels, shift=shift)
    assert_stats_equal(out.token_stats, token)
    assert_stats_equal(out.full_stats, full)
    torch.testing.assert_close(out.sft_loss.double(), ce, atol=2e-5, rtol=2e-5)
    assert int(out.full_stats.counts.sum()) == int(out.token_stats.counts.sum()) * 40
    assert int(out.bin_stats.counts.sum()) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_tok, vocab, scale", [(1, 7, 1.0), (47, 600, 1.0), (123, 1100, 3.0), (47, 2, 30.0)])
@pytest.mark.parametrize("ce_options", [{}, SMOOTHED])
def test_telemetry_odd_shapes_and_extreme_logits(backend, n_tok, vocab, scale, ce_options):
    hidden, weight, bias, labels = make_batch(b=1, t=n_tok, d=8, v=vocab, seed=n_tok, scale=scale)
    labels[0, -1] = 0  # at least one supervised position
    out = fused_linear_calibration_loss(hidden[0], weight, labels[0], option_ids=None, bias=bias, calibration=None,
                                        shift=False, chunk_size=16, backend=backend, token_stats=True,
                                        full_stats=True, **ce_options)
    _, ce, _, token, full = oracle(hidden[0], weight, bias, labels[0], shift=False, **ce_options)
    assert_stats_equal(out.token_stats, token)
    assert_stats_equal(out.full_stats, full)
    torch.testing.assert_close(out.sft_loss.double(), ce, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_take_the_lowest_index(backend):
    """Zero weights: every logit equal, so the prediction is token 0 and only label 0 is correct."""
    hidden, _, _, _ = make_batch(b=1, t=6, v=5)
    labels = torch.tensor([[IGNORE, 0, 3, 0, 4, 1]])
    out = fused_linear_calibration_loss(hidden[0], torch.zeros(5, 12), labels[0], option_ids=None, shift=False,
                                        calibration=None, backend=backend, token_stats=True, full_stats=True)
    assert out.token_stats.counts[2] == 5 and out.token_stats.sum_correct.sum() == 2  # c = 1/5 in bin 2
    assert out.full_stats.counts[2] == 25 and out.full_stats.sum_correct[2] == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("softcap, ce_options", [(None, {}), (4.0, {}), (None, SMOOTHED),
                                                 (4.0, {"label_smoothing": 0.1}), (None, {"lse_square_scale": 1e-2})])
def test_token_hard_bin_matches_float64(backend, softcap, ce_options):
    hidden, weight, bias, labels = make_batch(seed=3)
    inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    ref_inputs = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    args = dict(bin_accuracy=ACCURACY, lam=0.7, sft_weight=1.3, logit_softcap=softcap, **ce_options)
    out = fused_linear_calibration_loss(inputs[0], inputs[1], labels, option_ids=None, bias=inputs[2],
                                        calibration="token_hard_bin", chunk_size=4, backend=backend,
                                        token_stats=True, **args)
    loss, ce, cal, token, _ = oracle(*ref_inputs, labels, **args)
    for got, want in ((out.loss, loss), (out.sft_loss, ce), (out.cal_loss, cal)):
        torch.testing.assert_close(got.double(), want.detach(), atol=2e-5, rtol=2e-5)
    assert out.sft_loss.grad_fn is None and out.cal_loss.grad_fn is None
    for got, want in zip(torch.autograd.grad(out.loss * 1.7, inputs), torch.autograd.grad(loss * 1.7, ref_inputs)):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    assert_stats_equal(out.token_stats, token)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_items", [50, torch.tensor(23)])
def test_token_hard_bin_with_options_and_num_items(backend, num_items):
    """The token term beside option_ids (answer statistics still binned) and a gradient-accumulation count."""
    hidden, weight, _, labels = make_batch(seed=5)
    labels[1, 4] = 7
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    rh, rw = hidden.double().requires_grad_(), weight.double().requires_grad_()
    out = fused_linear_calibration_loss(h, w, labels, option_ids=[7, 9], calibration="token_hard_bin",
                                        bin_accuracy=ACCURACY, num_items_in_batch=num_items, chunk_size=3,
                                        backend=backend, full_stats=True)
    loss, _, _, _, full = oracle(rh, rw, None, labels, bin_accuracy=ACCURACY, num_items_in_batch=num_items)
    torch.testing.assert_close(out.loss.double(), loss.detach(), atol=2e-5, rtol=2e-5)
    for got, want in zip(torch.autograd.grad(out.loss, [h, w]), torch.autograd.grad(loss, [rh, rw])):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)
    assert_stats_equal(out.full_stats, full)
    assert out.token_stats is None and int(out.bin_stats.counts.sum()) == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    skip_unsupported_dtype(backend, dtype)
    hidden, weight, bias, labels = make_batch(seed=6, dtype=dtype)
    inputs = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    out = fused_linear_calibration_loss(inputs[0], inputs[1], labels, option_ids=None, bias=inputs[2],
                                        calibration="token_hard_bin", bin_accuracy=ACCURACY, chunk_size=5,
                                        backend=backend, token_stats=True, full_stats=True)
    ref_inputs = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    loss, _, _, token, full = oracle(*ref_inputs, labels, bin_accuracy=ACCURACY)
    torch.testing.assert_close(out.loss.double(), loss.detach(), atol=3e-2, rtol=3e-2)
    for got, want in zip(torch.autograd.grad(out.loss, inputs), torch.autograd.grad(loss, ref_inputs)):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
    for got, want in ((out.token_stats, token), (out.full_stats, full)):
        assert torch.equal(got.counts.sum(), want.counts.sum())
        torch.testing.assert_close(got.sum_conf.sum(), want.sum_conf.sum(), atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_rows_are_skipped_and_poison_the_loss(backend):
    hidden, weight, bias, labels = make_batch(seed=7)
    labels[0, 5] = 3
    hidden[0, 4, 0] = float("inf")  # the position predicting labels[0, 5]
    out = fused_linear_calibration_loss(hidden, weight, labels, option_ids=None, bias=bias,
                                        calibration="token_hard_bin", bin_accuracy=ACCURACY, backend=backend,
                                        token_stats=True, full_stats=True)
    assert torch.isnan(out.loss) and torch.isnan(out.cal_loss)
    finite = labels.clone()
    finite[0, 5] = IGNORE
    _, _, _, token, full = oracle(hidden.nan_to_num(posinf=0.0), weight, bias, finite)
    for got, want in ((out.token_stats, token), (out.full_stats, full)):
        assert int(got.n_skipped) == 1
        assert torch.equal(got.counts, want.counts) and torch.equal(got.sum_correct, want.sum_correct)


def test_all_ignored_and_no_grad():
    hidden, weight, bias, labels = make_batch(seed=8)
    args = dict(option_ids=None, bias=bias, calibration="token_hard_bin", bin_accuracy=ACCURACY, token_stats=True)
    out = fused_linear_calibration_loss(hidden, weight, torch.full_like(labels, IGNORE), **args)
    assert out.loss.item() == 0.0 and int(out.token_stats.counts.sum()) == 0
    want = fused_linear_calibration_loss(hidden, weight, labels, **args)
    with torch.no_grad():
        got = fused_linear_calibration_loss(hidden.requires_grad_(), weight, labels, **args)
    assert got.loss.grad_fn is None
    torch.testing.assert_close(got.loss, want.loss)
    assert torch.equal(got.token_stats.counts, want.token_stats.counts)


def test_statistics_add_over_batches():
    """Two halves summed (as an all-reduce would) equal the whole batch."""
    hidden, weight, bias, labels = make_batch(b=4, seed=9)
    args = dict(option_ids=None, bias=bias, calibration=None, token_stats=True, full_stats=True)
    whole = fused_linear_calibration_loss(hidden, weight, labels, **args)
    halves = [fused_linear_calibration_loss(hidden[i:i + 2], weight, labels[i:i + 2], **args) for i in (0, 2)]
    for name in ("token_stats", "full_stats"):
        merged = getattr(halves[0], name) + getattr(halves[1], name)
        assert torch.equal(merged.counts, getattr(whole, name).counts)
        torch.testing.assert_close(merged.sum_conf, getattr(whole, name).sum_conf)


def test_module_passes_the_flags():
    hidden, weight, bias, labels = make_batch()
    module = calibkern.FusedLinearCalibrationLoss(None, calibration="token_hard_bin", bin_accuracy=ACCURACY,
                                                  token_stats=True, full_stats=True)
    got = module(hidden, weight, labels, bias=bias)
    want = fused_linear_calibration_loss(hidden, weight, labels, option_ids=None, bias=bias,
                                         calibration="token_hard_bin", bin_accuracy=ACCURACY, full_stats=True)
    torch.testing.assert_close(got.loss, want.loss)
    assert torch.equal(got.full_stats.counts, want.full_stats.counts)


@pytest.mark.parametrize("changes, error, name", [
    ({"calibration": "hard_bin", "bin_accuracy": ACCURACY}, ValueError, "option_ids"),
    ({"calibration": "token_hard_bin"}, ValueError, "bin_accuracy"),
    ({"calibration": "token_hard_bin", "bin_accuracy": torch.full((4,), 0.5)}, ValueError, "bin_accuracy"),
    ({"calibration": "token_hard_bin", "bin_accuracy": torch.full((M,), 1.5)}, ValueError, "bin_accuracy"),
    ({"token_stats": 1}, TypeError, "token_stats"),
    ({"full_stats": "yes"}, TypeError, "full_stats"),
])
def test_bad_input_names_the_argument(changes, error, name):
    hidden, weight, _, labels = make_batch()
    args = {"option_ids": None, "calibration": None, **changes}
    with pytest.raises(error, match=name):
        fused_linear_calibration_loss(hidden, weight, labels, **args)


@pytest.mark.parametrize("ce_options", [{}, SMOOTHED], ids=["plain", "smoothed"])
def test_compiles_fullgraph_and_equals_eager(ce_options):
    """Under torch.compile every position is a row (ignored ones masked): the same statistics and gradients."""
    hidden, weight, bias, labels = make_batch(seed=10)

    def step(h, w):
        out = fused_linear_calibration_loss(h, w, labels, option_ids=None, bias=bias, calibration="token_hard_bin",
                                            bin_accuracy=ACCURACY, token_stats=True, full_stats=True, **ce_options)
        return out.loss, out.token_stats.counts, out.full_stats.counts, out.full_stats.sum_conf

    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(step, fullgraph=True, backend="aot_eager"), step):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        outputs = fn(h, w)
        results.append((*outputs, *torch.autograd.grad(outputs[0], [h, w])))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
