"""EM state, E-step, M-step and both regulariser forms (docs/math.md#em-regulariser)."""

import pytest
import torch

import calibkern as ck
from calibkern.reference import bin_index, responsibilities, softmax_parts

from helpers import random_labels, random_logits

BACKENDS = ck.available_backends()


def test_initial_state():
    st = ck.EMState(n_components=5)
    torch.testing.assert_close(st.mu, torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64))
    torch.testing.assert_close(st.sigma, torch.full((5,), 0.1, dtype=torch.float64))
    torch.testing.assert_close(st.pi, torch.full((5,), 0.2, dtype=torch.float64))
    torch.testing.assert_close(st.theta, st.mu)


def test_estep_statistics_match_the_definition():
    logits, labels = random_logits(500, 4, seed=1), random_labels(500, 4, ignore_frac=0.2, seed=1)
    st = ck.EMState(6)
    stats = st.estep(logits, labels)
    keep = labels != -100
    p = logits[keep].double().softmax(1)
    c, pred = p.max(1)
    log_pi, mu, sigma, _ = (t.double() for t in st.kernel_params("cpu"))
    score = log_pi - sigma.log() - (c[:, None] - mu) ** 2 / (2 * sigma ** 2)
    r = score.softmax(1)
    correct = (pred == labels[keep]).double()
    expected = torch.stack([r.sum(0), (r * c[:, None]).sum(0), (r * c[:, None] ** 2).sum(0),
                            (r * correct[:, None]).sum(0)])
    torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st.accum, stats)


def test_estep_with_vanishing_sigma_is_hard_binning():
    m = 10
    logits, labels = random_logits(2000, 4, seed=2), random_labels(2000, 4, seed=2)
    st = ck.EMState(m)
    st.sigma = torch.full((m,), 1e-4, dtype=torch.float64)
    stats = st.estep(logits, labels)
    hard = ck.binned_stats(logits, labels, m)
    _, conf, _ = softmax_parts(logits)
    near_edge = ((conf * m - (conf * m).round()).abs() < 1e-2).sum().item()
    # every sample away from an edge gets all of its responsibility from its own bin
    assert (stats[0] - hard.counts.double()).abs().sum().item() <= 2 * near_edge + 1e-6
    torch.testing.assert_close(stats[3], hard.sum_correct, atol=near_edge + 1e-6, rtol=0)


def test_mstep_formulas():
    logits, labels = random_logits(800, 4, seed=3), random_labels(800, 4, seed=3)
    st = ck.EMState(5, prior=(2.0, 3.0))
    stats = st.estep(logits, labels)
    st.mstep()
    s, c, q, r = stats
    torch.testing.assert_close(st.pi, s / s.sum())
    torch.testing.assert_close(st.mu, c / s)
    torch.testing.assert_close(st.sigma, torch.sqrt((q / s - (c / s) ** 2).clamp_min((1 / 20) ** 2)))
    torch.testing.assert_close(st.theta, (r + 2.0) / (s + 5.0))
    assert st.accum.abs().sum() == 0


def test_stream_refresh_is_an_ema_of_batch_statistics():
    logits, labels = random_logits(600, 4, seed=4), random_labels(600, 4, seed=4)
    st = ck.EMState(4, refresh="stream", momentum=0.8, fixed_components=True)
    first = st.estep(logits[:300], labels[:300])
    st.mstep()
    second = st.estep(logits[300:], labels[300:])
    st.mstep()
    torch.testing.assert_close(st.running, 0.8 * first + 0.2 * second)
    torch.testing.assert_close(st.mu, (torch.arange(4, dtype=torch.float64) + 0.5) / 4)  # fixed components


def test_state_dict_round_trip():
    logits, labels = random_logits(300, 4, seed=5), random_labels(300, 4, seed=5)
    st = ck.EMState(7, refresh="stream")
    st.estep(logits, labels)
    st.mstep()
    st.estep(logits[:100], labels[:100])
    other = ck.EMState(7, refresh="stream")
    other.load_state_dict(st.state_dict())
    for name, value in st.state_dict().items():
        assert torch.equal(value, other.state_dict()[name]), name
    with pytest.raises(ValueError, match="shape"):
        ck.EMState(5).load_state_dict(st.state_dict())


def _target_form_eager(logits, labels, st):
    from calibkern.reference import non_max_targets

    p, conf, pred = softmax_parts(logits)
    log_pi, mu, sigma, theta = st.kernel_params("cpu")
    r = responsibilities(conf.detach(), log_pi, mu, sigma)
    t = (r @ theta.to(r.dtype)).detach()
    tau = non_max_targets(p.detach(), pred, t)
    keep = labels != -100
    return ((p - tau) ** 2).sum(1)[keep].mean()


def test_target_form_value_and_gradient():
    logits = random_logits(40, 4, dtype=torch.float64, seed=6).requires_grad_(True)
    labels = random_labels(40, 4, ignore_frac=0.2, seed=6)
    st = ck.EMState(5)
    st.estep(logits.detach(), labels)
    st.mstep()
    ours = ck.em_regularizer(logits, labels, st)
    ours.backward()
    grad = logits.grad.clone()
    logits.grad = None
    eager = _target_form_eager(logits, labels, st)
    eager.backward()
    assert ours.item() == pytest.approx(eager.item(), rel=1e-10)
    torch.testing.assert_close(grad, logits.grad)


def _uniform_responsibilities(m):
    """Identical components: r_k = 1/M whatever the confidence, so the detached gradient is exact."""
    st = ck.EMState(m)
    st.mu = torch.full((m,), 0.5, dtype=torch.float64)
    st.sigma = torch.full((m,), 0.3, dtype=torch.float64)
    st.theta = torch.linspace(0.2, 0.8, m, dtype=torch.float64)
    return st


def test_target_form_gradcheck_where_exact():
    logits = random_logits(10, 2, dtype=torch.float64, seed=9).requires_grad_(True)
    labels = random_labels(10, 2, ignore_frac=0.2, seed=9)
    st = _uniform_responsibilities(4)
    assert torch.autograd.gradcheck(lambda z: ck.em_regularizer(z, labels, st, backend="torch"), (logits,))


@pytest.mark.parametrize("rho", ["square", "smooth_abs"])
def test_ece_form_gradcheck_and_value(rho):
    logits = random_logits(30, 3, dtype=torch.float64, seed=7).requires_grad_(True)
    labels = random_labels(30, 3, seed=7)
    st = ck.EMState(4)
    loss = ck.em_regularizer(logits, labels, st, form="ece", rho=rho)
    _, conf, pred = softmax_parts(logits.detach())
    log_pi, mu, sigma, theta = st.kernel_params("cpu")
    r = responsibilities(conf, log_pi, mu, sigma)
    s, c = r.sum(0), (r * conf[:, None]).sum(0)
    d = c / s - theta.double()
    rho_d = d * d if rho == "square" else torch.sqrt(d * d + 1e-6) - 1e-3
    assert loss.item() == pytest.approx((s / 30 * rho_d).sum().item(), rel=1e-10)
    # gradient against autograd of the same loss with the responsibilities detached
    z = logits.detach().clone().requires_grad_(True)
    p = z.softmax(1)
    c_live = p.max(1).values
    c_k = (r * c_live[:, None]).sum(0)
    d_live = c_k / s - theta.double()
    rho_live = d_live * d_live if rho == "square" else torch.sqrt(d_live * d_live + 1e-6) - 1e-3
    (s / 30 * rho_live).sum().backward()
    loss.backward()
    torch.testing.assert_close(logits.grad, z.grad)
    uniform = _uniform_responsibilities(4)
    assert torch.autograd.gradcheck(lambda x: ck.em_regularizer(x, labels, uniform, form="ece", rho=rho),
                                    (logits.detach().clone().requires_grad_(True),))


def test_accumulate_adds_the_pass_statistics():
    logits, labels = random_logits(100, 4, seed=8), random_labels(100, 4, seed=8)
    a, b = ck.EMState(5), ck.EMState(5)
    ck.em_regularizer(logits, labels, a, accumulate=True)
    b.estep(logits, labels)
    torch.testing.assert_close(a.accum, b.accum)
    ck.em_regularizer(logits, labels, a)
    torch.testing.assert_close(a.accum, b.accum)  # nothing unless asked


def test_em_iterations_recover_the_data_accuracy():
    # Confidence 0.9 but only 60 % correct: θ of the components holding the mass must move towards 0.6.
    n = 4000
    logits = torch.zeros(n, 4)
    logits[:, 0] = torch.log(torch.tensor(0.9 / (0.1 / 3)))
    labels = torch.where(torch.rand(n) < 0.6, 0, 1)
    st = ck.EMState(10)
    for _ in range(3):
        st.estep(logits, labels)
        st.mstep()
    heavy = st.pi.argmax()
    assert abs(st.theta[heavy].item() - 0.6) < 0.03
    assert bin_index(torch.tensor([0.9]), 10).item() == 9


@pytest.mark.parametrize("m", [25, 64])
def test_backends_agree_on_empty_components_over_iterations(m):
    """Components far from every confidence are empty on every backend (S̄_k ≤ 1e-8 ΣS̄, however each kernel
    rounds or floors their responsibilities) and keep μ and σ; the others move alike."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(600, 4, generator=g) * 2, torch.randint(0, 4, (600,), generator=g)
    states = {name: ck.EMState(m) for name in BACKENDS}
    for _ in range(3):
        before = {name: (st.mu.clone(), st.sigma.clone()) for name, st in states.items()}
        for name, st in states.items():
            st.estep(logits, labels, backend=name)
            st.mstep()
        want = states["torch"]
        empty = want.running[0] <= ck.em.EMPTY_MASS * want.running[0].sum()
        assert empty.any() and not empty.all()
        for name, st in states.items():
            assert torch.equal(st.running[0] <= ck.em.EMPTY_MASS * st.running[0].sum(), empty), name
            assert torch.equal(st.mu[empty], before[name][0][empty]) and torch.equal(st.sigma[empty],
                                                                                    before[name][1][empty])
            for key in ("mu", "sigma", "pi", "theta"):
                torch.testing.assert_close(getattr(st, key), getattr(want, key), rtol=1e-5, atol=1e-6,
                                           msg=lambda msg: f"{name} {key}: {msg}")
