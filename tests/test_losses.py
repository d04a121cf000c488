"""Tests of spaceft.losses: hand-worked values, gradients, degeneracy, stability and validation."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch

from spaceft.losses import (
    LossOutput,
    LossType,
    compute_loss,
    ipo_loss,
    sft_loss,
    simpo_loss,
    space_loss,
    spin_loss,
    tspin_loss,
)

F64 = torch.float64


def t(*values: float | list[float], dtype: torch.dtype = F64) -> torch.Tensor:
    return torch.tensor(list(values), dtype=dtype)


def assert_close(actual: torch.Tensor, expected: float | list[float] | torch.Tensor) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# hand-worked values
# --------------------------------------------------------------------------------------------------


def test_space_mu1_hand_computed() -> None:
    """μ = 1, β = 1, K = 1.

    r_real = −1 − (−2) = 1, r_syn = −3 − (−2) = −1, log μ = 0.
    L = softplus(0 − 1) + 1·softplus(−1 − 0) = 2·log(1 + e^−1) = 2·0.3132616875 = 0.6265233750.
    """
    out = space_loss(t(-1.0), t([-3.0]), t(-2.0), t([-2.0]), mu=1.0, beta=1.0)
    assert isinstance(out, LossOutput)
    assert_close(out.losses, [0.6265233750364457])
    assert_close(out.real_rewards, [1.0])
    assert_close(out.synthetic_rewards, [[-1.0]])


def test_space_mu3_beta_half_two_samples() -> None:
    """μ = 3, β = 0.5, K = 2.

    r_real = 0.5·(−4 − (−6)) = 1;  r_syn = 0.5·([−5, −1] − [−3, −3]) = [−1, 1].
    softplus(log 3 − 1)  = log(1 + 3/e)     = log(2.1036383) = 0.7436684
    softplus(−1 − log 3) = log(1 + 1/(3e))  = log(1.1226265) = 0.1156710
    softplus(1 − log 3)  = log(1 + e/3)     = log(1.9060939) = 0.6450561
    L = 0.7436684 + 3·(0.1156710 + 0.6450561)/2 = 0.7436684 + 1.1410907 = 1.8847590.
    """
    out = space_loss(t(-4.0), t([-5.0, -1.0]), t(-6.0), t([-3.0, -3.0]), mu=3.0, beta=0.5)
    assert_close(out.losses, [1.8847590361115096])
    assert_close(out.real_rewards, [1.0])
    assert_close(out.synthetic_rewards, [[-1.0, 1.0]])


def test_spin_sigmoid_and_hinge_hand_computed() -> None:
    """β = 0.1, K = 2.

    r_real = 0.1·(−10 − (−20)) = 1; r_syn = 0.1·([−30, −20] − [−20, −20]) = [−1, 0]; margins [2, 1].
    sigmoid: (log(1 + e^−2) + log(1 + e^−1))/2 = (0.1269280 + 0.3132617)/2 = 0.2200948.
    hinge:   (max(0, 1 − 2) + max(0, 1 − 1))/2 = 0.
    """
    args = (t(-10.0), t([-30.0, -20.0]), t(-20.0), t([-20.0, -20.0]))
    out = spin_loss(*args, beta=0.1)
    assert_close(out.losses, [0.22009484928059775])
    assert_close(out.real_rewards, [1.0])
    assert_close(out.synthetic_rewards, [[-1.0, 0.0]])
    assert_close(spin_loss(*args, beta=0.1, kind="hinge").losses, [0.0])


def test_tspin_hand_computed() -> None:
    """T-SPIN (arXiv 2601.08198, Eq. 7) with the paper's α = 1, β = 0.1, K = 1.

    c = α·log p_θ: c(y) = −1, c(y') = −2, c(y0) = −4.
    current: ℓ(−1 − (−2)) = log(1 + e^−1) = 0.3132616875
    history: ℓ(−2 − (−4)) = log(1 + e^−2) = 0.1269280110
    L = 0.3132616875 + 0.1·0.1269280110 = 0.3259544886.
    """
    out = tspin_loss(t(-1.0), t([-2.0]), t(-4.0))
    assert_close(out.losses, [0.32595448862252013])
    assert_close(out.real_rewards, [-1.0])
    assert_close(out.synthetic_rewards, [[-2.0]])
    assert out.proto_rewards is not None
    assert_close(out.proto_rewards, [-4.0])


def test_tspin_alpha_half_two_samples() -> None:
    """α = 0.5, β = 0.3, K = 2: log p_θ(y) = −6, log p_θ(y') = [−4, −10], log p_θ(y0) = −8.

    c(y) = −3, c(y') = [−2, −5], c(y0) = −4.
    current: (ℓ(−3 + 2) + ℓ(−3 + 5))/2 = (log(1 + e) + log(1 + e^−2))/2 = (1.3132617 + 0.1269280)/2
           = 0.7200948
    history: (ℓ(−2 + 4) + ℓ(−5 + 4))/2 = (0.1269280 + 1.3132617)/2 = 0.7200948
    L = 0.7200948·(1 + 0.3) = 0.9361233; with β = 0 only the current term is left.
    """
    args = (t(-6.0), t([-4.0, -10.0]), t(-8.0))
    out = tspin_loss(*args, alpha=0.5, history_weight=0.3)
    assert_close(out.losses, [0.936123304064777])
    assert_close(out.real_rewards, [-3.0])
    assert_close(out.synthetic_rewards, [[-2.0, -5.0]])
    assert_close(tspin_loss(*args, alpha=0.5, history_weight=0.0).losses, [0.7200948492805976])


def test_tspin_autograd_equals_theorem_1() -> None:
    """Theorem 1 of the paper with ℓ' (z) = −σ(−z), u = c(y) − c(y'), v = c(y') − c(y0):

    ∂L/∂log p(y) = α·ℓ'(u),  ∂L/∂log p(y') = α·(−ℓ'(u) + β·ℓ'(v)),  ∂L/∂log p(y0) = −α·β·ℓ'(v).
    """
    g = torch.Generator().manual_seed(7)
    real, syn, proto = (-20 * torch.rand(5, generator=g, dtype=F64) for _ in range(3))
    real.requires_grad_(), syn.requires_grad_(), proto.requires_grad_()
    alpha, beta = 0.7, 0.3
    tspin_loss(real, syn.unsqueeze(-1), proto, alpha=alpha, history_weight=beta).losses.sum().backward()
    with torch.no_grad():
        d_u = -torch.sigmoid(-alpha * (real - syn))  # ℓ'(u)
        d_v = -torch.sigmoid(-alpha * (syn - proto))  # ℓ'(v)
    assert real.grad is not None and syn.grad is not None and proto.grad is not None
    assert_close(real.grad, alpha * d_u)
    assert_close(syn.grad, alpha * (-d_u + beta * d_v))
    assert_close(proto.grad, -alpha * beta * d_v)


def test_tspin_without_history_is_reference_free_spin() -> None:
    """β = 0: T-SPIN is SPIN's logistic loss with the opponent's log-probs replaced by 0 and λ = α."""
    x = _random_inputs()
    real, syn = x["policy_real_logps"], x["policy_synthetic_logps"]
    proto = -torch.rand(4, dtype=F64) * 30
    out = tspin_loss(real, syn, proto, alpha=0.4, history_weight=0.0)
    spin = spin_loss(real, syn, torch.zeros_like(real), torch.zeros_like(syn), beta=0.4)
    torch.testing.assert_close(out.losses, spin.losses, rtol=1e-15, atol=0)


def test_spin_hinge_active() -> None:
    """β = 0.5: r_real = 0.5·(−1 − (−2)) = 0.5; r_syn = 0.5·([−2, 1] − [−2, −2]) = [0, 1.5].
    margins [0.5, −1]; hinge = (0.5 + 2)/2 = 1.25.
    """
    out = spin_loss(t(-1.0), t([-2.0, 1.0]), t(-2.0), t([-2.0, -2.0]), beta=0.5, kind="hinge")
    assert_close(out.losses, [1.25])


def test_ipo_hand_computed() -> None:
    """τ = 0.1, target 1/(2τ) = 5.

    real log-ratio −8 − (−10) = 2; synthetic log-ratios [−4 − (−3), 1 − (−2)] = [−1, 3];
    h = [3, −1]; L = ((3 − 5)² + (−1 − 5)²)/2 = (4 + 36)/2 = 20.
    """
    out = ipo_loss(t(-8.0), t([-4.0, 1.0]), t(-10.0), t([-3.0, -2.0]), tau=0.1)
    assert_close(out.losses, [20.0])
    assert_close(out.real_rewards, [2.0])
    assert_close(out.synthetic_rewards, [[-1.0, 3.0]])


def test_simpo_hand_computed() -> None:
    """β = 2, γ = 1.

    r_real = 2·(−6/3) = −4; r_syn = 2·([−12, −2]/[4, 2]) = [−6, −2];
    z = −4 − [−6, −2] − 1 = [1, −3]; L = (log(1 + e^−1) + log(1 + e^3))/2 = (0.3132617 + 3.0485874)/2
      = 1.6809245.
    """
    out = simpo_loss(t(-6.0), t([-12.0, -2.0]), t(3.0), t([4.0, 2.0]), beta=2.0, gamma=1.0)
    assert_close(out.losses, [1.6809245195459825])
    assert_close(out.real_rewards, [-4.0])
    assert_close(out.synthetic_rewards, [[-6.0, -2.0]])


def test_simpo_integer_lengths() -> None:
    out = simpo_loss(t(-6.0), t([-12.0, -2.0]), torch.tensor([3]), torch.tensor([[4, 2]]))
    assert_close(out.losses, [1.6809245195459825])


def test_sft_loss_hand_computed() -> None:
    """Row 0: tokens −1, −2, −3 kept, a masked −inf ignored → (1 + 2 + 3)/3 = 2.
    Row 1: masked prompt token 5, response −0.5 → 0.5.
    """
    logps = torch.tensor([[-1.0, -2.0, -3.0, -math.inf], [5.0, -0.5, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 0, 0]])
    assert_close(sft_loss(logps, mask), [2.0, 0.5])


def test_per_prompt_losses_do_not_depend_on_batch_split() -> None:
    """Losses are per prompt, so any split of the batch (ranks, accumulation) gives the same values."""
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(6, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)]
    args += [torch.randn(6, generator=g, dtype=F64), torch.randn(6, 3, generator=g, dtype=F64)]
    full = space_loss(*args, mu=3.0).losses
    parts = [space_loss(*(a[s] for a in args), mu=3.0).losses for s in (slice(0, 2), slice(2, 6))]
    torch.testing.assert_close(torch.cat(parts), full, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# SPACE: equivalent form and analytic gradient
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0, 7.0])
@pytest.mark.parametrize("beta", [0.3, 1.0, 2.0])
def test_space_softplus_form_equals_sigma_mu_form(mu: float, beta: float) -> None:
    """L = −log σ_μ(r_real) − μ·mean_j log(1 − σ_μ(r_syn_j)), σ_μ(z) = 1/(1 + μ e^−z), direct form."""
    g = torch.Generator().manual_seed(1)
    # |r| stays below ~20: the direct form's log(1 − σ_μ) loses digits beyond that (the reason the
    # library uses the softplus form).
    pr, orr = torch.randn(5, generator=g, dtype=F64) * 2, torch.randn(5, generator=g, dtype=F64) * 2
    ps, os_ = torch.randn(5, 4, generator=g, dtype=F64) * 2, torch.randn(5, 4, generator=g, dtype=F64) * 2
    out = space_loss(pr, ps, orr, os_, mu=mu, beta=beta)
    sigma_mu = lambda z: 1.0 / (1.0 + mu * torch.exp(-z))  # noqa: E731
    r_real, r_syn = beta * (pr - orr), beta * (ps - os_)
    expected = -torch.log(sigma_mu(r_real)) - mu * torch.log(1.0 - sigma_mu(r_syn)).mean(-1)
    torch.testing.assert_close(out.losses, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mu", [0.5, 1.0, 3.0, 7.0])
@pytest.mark.parametrize("beta", [0.3, 1.0])
def test_space_autograd_equals_analytic_gradient(mu: float, beta: float) -> None:
    """dL/dlog p_θ(y) = −β(1 − σ_μ(r_real)); dL/dlog p_θ(y'_j) = (μ/K)·β·σ_μ(r_syn_j); opponent: negated."""
    g = torch.Generator().manual_seed(2)
    k = 3
    pr = (torch.randn(4, generator=g, dtype=F64) * 3).requires_grad_()
    ps = (torch.randn(4, k, generator=g, dtype=F64) * 3).requires_grad_()
    orr = (torch.randn(4, generator=g, dtype=F64) * 3).requires_grad_()
    os_ = (torch.randn(4, k, generator=g, dtype=F64) * 3).requires_grad_()
    out = space_loss(pr, ps, orr, os_, mu=mu, beta=beta)
    out.losses.sum().backward()
    sigma_mu = lambda z: 1.0 / (1.0 + mu * torch.exp(-z))  # noqa: E731
    r_real, r_syn = out.real_rewards, out.synthetic_rewards
    d_real = -beta * (1.0 - sigma_mu(r_real))
    d_syn = mu / k * beta * sigma_mu(r_syn)
    for actual, expected in ((pr.grad, d_real), (ps.grad, d_syn), (orr.grad, -d_real), (os_.grad, -d_syn)):
        assert actual is not None
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-14)


def test_spin_autograd_equals_analytic_gradient() -> None:
    """m_j = r_real − r_syn_j; dL/dlog p_θ(y) = −β mean_j σ(−m_j); dL/dlog p_θ(y'_j) = β σ(−m_j)/K."""
    g = torch.Generator().manual_seed(3)
    beta, k = 0.1, 2
    pr = (torch.randn(3, generator=g, dtype=F64) * 20).requires_grad_()
    ps = (torch.randn(3, k, generator=g, dtype=F64) * 20).requires_grad_()
    out = spin_loss(pr, ps, torch.zeros(3, dtype=F64), torch.zeros(3, k, dtype=F64), beta=beta)
    out.losses.sum().backward()
    s = torch.sigmoid(-(out.real_rewards.unsqueeze(-1) - out.synthetic_rewards))
    assert pr.grad is not None and ps.grad is not None
    torch.testing.assert_close(pr.grad, -beta * s.mean(-1), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(ps.grad, beta * s / k, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------------
# degeneracy: the synthetic response is the real one
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sigmoid", "hinge"])
def test_spin_is_blind_when_synthetic_equals_real(kind: str) -> None:
    """y' = y ⇒ r_syn = r_real for every θ: SPIN's loss is ℓ(0) whatever r, and its gradient is exactly 0."""
    beta = 0.1
    r = torch.linspace(-50.0, 50.0, 101, dtype=F64)
    opponent = torch.full_like(r, -12.5)
    theta = (opponent + r / beta).requires_grad_()  # log p_θ(y) with reward r
    out = spin_loss(theta, theta.unsqueeze(-1), opponent, opponent.unsqueeze(-1), beta=beta, kind=kind)
    constant = math.log(2.0) if kind == "sigmoid" else 1.0
    torch.testing.assert_close(out.losses, torch.full_like(r, constant), rtol=0, atol=0)
    out.losses.sum().backward()
    assert theta.grad is not None
    assert torch.equal(theta.grad, torch.zeros_like(r))


def test_tspin_terms_are_blind_to_identical_responses() -> None:
    """y' = y: the current term is ℓ(0) = log 2 with zero gradient; y0 = y': the historical term too.

    Per pair, T-SPIN is as blind as SPIN; unlike SPIN it has no reference, so *in expectation* over
    distinct y, y' from the same distribution it is not stationary (tests/test_lab.py).
    """
    logp = torch.linspace(-40.0, -0.5, 9, dtype=F64).requires_grad_()
    out = tspin_loss(logp, logp.unsqueeze(-1), logp.detach().clone(), history_weight=0.1)
    torch.testing.assert_close(out.losses, torch.full_like(logp, 1.1 * math.log(2.0)), rtol=1e-15, atol=0)
    out.losses.sum().backward()
    assert logp.grad is not None
    torch.testing.assert_close(logp.grad, 0.1 * -0.5 * torch.ones_like(logp), rtol=1e-15, atol=0)
    # the current term's ±α·ℓ'(0) cancel; what is left is the historical term's β·α·ℓ'(0) = −0.05 on y'
    # (y0 was detached); with y0 the same tensor as y = y' that cancels too
    logp.grad = None
    tspin_loss(logp, logp.unsqueeze(-1), logp).losses.sum().backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))


@pytest.mark.parametrize("mu", [0.25, 1.0, 3.0, 7.0])
def test_space_has_unique_minimum_at_zero_reward_when_synthetic_equals_real(mu: float) -> None:
    """y' = y: f(r) = softplus(log μ − r) + μ·softplus(r − log μ), f'(r) = −σ(log μ − r) + μσ(r − log μ).

    f'(0) = −μ/(1 + μ) + μ/(1 + μ) = 0 and f' is strictly increasing, so r = 0 (p_θ(y) = p_θt(y)) is the
    unique minimiser for every μ; checked on a grid and through autograd's derivative.
    """
    r = torch.linspace(-20.0, 20.0, 4001, dtype=F64).requires_grad_()  # step 0.01, r = 0 at index 2000
    opponent = torch.full_like(r, -7.0)
    theta = opponent + r
    out = space_loss(theta, theta.unsqueeze(-1), opponent, opponent.unsqueeze(-1), mu=mu)
    f = out.losses
    zero = 2000
    assert abs(r[zero].item()) < 1e-12
    assert int(torch.argmin(f)) == zero
    others = torch.cat([f[:zero], f[zero + 1 :]])
    assert bool((others > f[zero]).all())
    expected_min = math.log1p(mu) + mu * math.log1p(1.0 / mu)
    assert f[zero].item() == pytest.approx(expected_min, rel=1e-12)
    f.sum().backward()
    assert r.grad is not None
    assert abs(r.grad[zero].item()) < 1e-12
    assert bool((r.grad[:zero] < 0).all()) and bool((r.grad[zero + 1 :] > 0).all())


# --------------------------------------------------------------------------------------------------
# numerical stability
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss_type", list(LossType))
def test_large_magnitude_logps_are_finite(dtype: torch.dtype, loss_type: LossType) -> None:
    """Summed log-probs of long responses (|log p| ~ 5000, |r| in the thousands): finite losses and grads."""
    pr = torch.tensor([-5000.0, -200.0, -4000.0], dtype=dtype, requires_grad=True)
    ps = torch.tensor([[-100.0, -5000.0], [-4800.0, -10.0], [-4000.0, -3000.0]], dtype=dtype)
    ps.requires_grad_()
    orr = torch.tensor([-100.0, -5000.0, -4000.0], dtype=dtype)
    os_ = torch.tensor([[-5000.0, -100.0], [-10.0, -4800.0], [-3000.0, -4000.0]], dtype=dtype)
    lengths = torch.tensor([1000.0, 40.0, 900.0], dtype=dtype)
    out = compute_loss(
        loss_type,
        policy_real_logps=pr,
        policy_synthetic_logps=ps if loss_type.uses_synthetic else ps[:, :0],
        opponent_real_logps=orr,
        opponent_synthetic_logps=os_,
        real_lengths=lengths,
        synthetic_lengths=torch.full_like(os_, 500.0),
        policy_proto_logps=orr,
        mu=3.0,
    )
    assert out.losses.dtype == dtype
    assert bool(torch.isfinite(out.losses).all())
    out.losses.sum().backward()
    assert pr.grad is not None and bool(torch.isfinite(pr.grad).all())
    if loss_type.uses_synthetic:
        assert ps.grad is not None and bool(torch.isfinite(ps.grad).all())


def test_space_large_rewards_match_asymptotics() -> None:
    """r_real = 3000, r_syn = −3000, μ = 1: both softplus terms are e^−3000 → loss exactly 0, no overflow;
    r_real = −3000: loss ≈ 3000 (softplus(3000) = 3000 + log(1 + e^−3000))."""
    pr, ps = t(-2000.0, -5000.0), t([-5000.0], [-5000.0])
    out = space_loss(pr, ps, t(-5000.0, -2000.0), t([-2000.0], [-2000.0]))
    torch.testing.assert_close(out.losses, t(0.0, 3000.0), rtol=1e-12, atol=1e-300)


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def _valid() -> list[torch.Tensor]:
    return [torch.zeros(2, dtype=F64), torch.zeros(2, 3, dtype=F64)] * 2


@pytest.mark.parametrize(
    ("index", "bad", "match"),
    [
        (0, torch.zeros(3, dtype=F64), "batch sizes differ"),
        (0, torch.zeros(2, 1, dtype=F64), r"shape \[B\]"),
        (1, torch.zeros(2, dtype=F64), r"shape \[B, K\]"),
        (1, torch.zeros(2, 0, dtype=F64), "K=0"),
        (2, torch.zeros(3, dtype=F64), "opponent_real_logps"),
        (3, torch.zeros(2, 2, dtype=F64), "opponent_synthetic_logps"),
        (0, t(0.0, math.nan), "non-finite"),
        (3, torch.full((2, 3), -math.inf, dtype=F64), "non-finite"),
    ],
)
@pytest.mark.parametrize("loss", [space_loss, spin_loss, ipo_loss])
def test_pair_losses_reject_bad_inputs(
    loss: Callable[..., LossOutput], index: int, bad: torch.Tensor, match: str
) -> None:
    args = _valid()
    args[index] = bad
    with pytest.raises(ValueError, match=match):
        loss(*args)


@pytest.mark.parametrize("mu", [0.0, -1.0, math.nan, math.inf])
def test_space_rejects_bad_mu(mu: float) -> None:
    with pytest.raises(ValueError, match="mu must be"):
        space_loss(*_valid(), mu=mu)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda a: space_loss(*a, beta=0.0), "beta must be"),
        (lambda a: spin_loss(*a, beta=-0.1), "beta must be"),
        (lambda a: spin_loss(*a, kind="logistic"), "kind must be"),
        (lambda a: ipo_loss(*a, tau=0.0), "tau must be"),
        (lambda a: simpo_loss(a[0], a[1], torch.ones(2), torch.ones(2, 3), beta=0.0), "beta must be"),
        (lambda a: simpo_loss(a[0], a[1], torch.zeros(2), torch.ones(2, 3)), "real_lengths must be > 0"),
        (lambda a: simpo_loss(a[0], a[1], torch.ones(2), -torch.ones(2, 3)), "synthetic_lengths must be > 0"),
        (lambda a: simpo_loss(a[0], a[1], torch.ones(3), torch.ones(2, 3)), "real_lengths"),
        (lambda a: simpo_loss(a[0], a[1], torch.ones(2), torch.ones(2, 3), gamma=math.nan), "gamma"),
        (lambda a: tspin_loss(a[0], a[1], a[2], alpha=0.0), "alpha must be"),
        (lambda a: tspin_loss(a[0], a[1], a[2], history_weight=-0.1), "history_weight must be"),
        (lambda a: tspin_loss(a[0], a[1], a[2], history_weight=math.inf), "history_weight must be"),
        (lambda a: tspin_loss(a[0], a[1], torch.zeros(3, dtype=F64)), "policy_proto_logps"),
        (lambda a: tspin_loss(a[0], a[1], t(0.0, -math.inf)), "non-finite"),
        (lambda a: tspin_loss(a[0], a[0], a[2]), r"shape \[B, K\]"),
    ],
)
def test_bad_hyperparameters_and_lengths(call: Callable[[list[torch.Tensor]], object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call(_valid())


def test_sft_loss_rejects_bad_inputs() -> None:
    logps = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="at least one response token"):
        sft_loss(logps, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        sft_loss(logps, torch.full((2, 3), 2))
    with pytest.raises(ValueError, match="shape"):
        sft_loss(logps, torch.ones(2, 4))
    with pytest.raises(ValueError, match="non-finite"):
        sft_loss(torch.tensor([[math.nan, 0.0]]), torch.tensor([[1, 1]]))


def test_compute_loss_rejects_missing_inputs() -> None:
    pr, ps = torch.zeros(2, dtype=F64), torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match="needs opponent"):
        compute_loss(LossType.SPACE, policy_real_logps=pr, policy_synthetic_logps=ps)
    with pytest.raises(ValueError, match="needs real_lengths and synthetic_lengths"):
        compute_loss(LossType.SIMPO, policy_real_logps=pr, policy_synthetic_logps=ps)
    with pytest.raises(ValueError, match="needs policy_proto_logps"):
        compute_loss(LossType.TSPIN, policy_real_logps=pr, policy_synthetic_logps=ps)
    with pytest.raises(ValueError, match="needs real_lengths"):
        compute_loss(LossType.SFT, policy_real_logps=pr, policy_synthetic_logps=ps[:, :0])
    with pytest.raises(ValueError, match="real_lengths must be > 0"):
        compute_loss("sft", policy_real_logps=pr, policy_synthetic_logps=ps, real_lengths=torch.zeros(2))
    with pytest.raises(ValueError, match="is not a valid LossType"):
        compute_loss("dpo", policy_real_logps=pr, policy_synthetic_logps=ps)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------
# LossType and dispatch
# --------------------------------------------------------------------------------------------------


def test_loss_type_properties() -> None:
    assert {x.value for x in LossType} == {"space", "spin", "spin_hinge", "ipo", "simpo", "tspin", "sft"}
    assert {x for x in LossType if x.needs_opponent} == {
        LossType.SPACE,
        LossType.SPIN,
        LossType.SPIN_HINGE,
        LossType.IPO,
    }
    assert {x for x in LossType if not x.uses_synthetic} == {LossType.SFT}
    assert {x for x in LossType if x.length_normalized} == {LossType.SIMPO}
    assert {x for x in LossType if x.uses_proto} == {LossType.TSPIN}
    assert LossType.TSPIN.default_beta == 1.0  # the paper's α
    assert LossType.SPACE.default_beta == 1.0 and LossType.SPIN.default_beta == 0.1
    assert LossType.SIMPO.default_beta == 2.0 and LossType.IPO.default_beta is None
    assert LossType("space") is LossType.SPACE and f"{LossType.SPIN_HINGE}" == "spin_hinge"


def _random_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {
        "policy_real_logps": -torch.rand(4, generator=g, dtype=F64) * 30,
        "policy_synthetic_logps": -torch.rand(4, 2, generator=g, dtype=F64) * 30,
        "opponent_real_logps": -torch.rand(4, generator=g, dtype=F64) * 30,
        "opponent_synthetic_logps": -torch.rand(4, 2, generator=g, dtype=F64) * 30,
        "real_lengths": torch.tensor([3.0, 5.0, 7.0, 9.0], dtype=F64),
        "synthetic_lengths": torch.tensor([[2.0, 4.0]] * 4, dtype=F64),
    }


def _same(a: LossOutput, b: LossOutput) -> None:
    for x, y in ((a.losses, b.losses), (a.real_rewards, b.real_rewards)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    torch.testing.assert_close(a.synthetic_rewards, b.synthetic_rewards, rtol=0, atol=0)


def test_compute_loss_dispatch_equals_direct_calls() -> None:
    x = _random_inputs()
    pair = [x[k] for k in ("policy_real_logps", "policy_synthetic_logps")]
    pair += [x[k] for k in ("opponent_real_logps", "opponent_synthetic_logps")]
    lengths = (x["real_lengths"], x["synthetic_lengths"])
    # beta=None → method defaults (1.0, 0.1, 0.1, 2.0)
    _same(compute_loss(LossType.SPACE, **x), space_loss(*pair, mu=1.0, beta=1.0))
    _same(compute_loss(LossType.SPACE, **x, mu=3.0, beta=0.5), space_loss(*pair, mu=3.0, beta=0.5))
    _same(compute_loss(LossType.SPIN, **x), spin_loss(*pair, beta=0.1))
    _same(compute_loss(LossType.SPIN_HINGE, **x), spin_loss(*pair, beta=0.1, kind="hinge"))
    _same(compute_loss(LossType.IPO, **x, tau=0.3), ipo_loss(*pair, tau=0.3))
    _same(compute_loss(LossType.SIMPO, **x), simpo_loss(pair[0], pair[1], *lengths, beta=2.0, gamma=1.0))
    direct = simpo_loss(pair[0], pair[1], *lengths, beta=2.5, gamma=0.3)
    _same(compute_loss("simpo", **x, beta=2.5, gamma=0.3), direct)
    proto = x["opponent_real_logps"]
    _same(compute_loss("tspin", **x, policy_proto_logps=proto), tspin_loss(pair[0], pair[1], proto))
    direct = tspin_loss(pair[0], pair[1], proto, alpha=0.5, history_weight=0.3)
    tspin = compute_loss("tspin", **x, policy_proto_logps=proto, beta=0.5, history_weight=0.3)
    _same(tspin, direct)
    assert tspin.proto_rewards is not None and direct.proto_rewards is not None
    torch.testing.assert_close(tspin.proto_rewards, direct.proto_rewards, rtol=0, atol=0)


def test_compute_loss_sft_is_mean_token_nll() -> None:
    """SFT: −log p(y)/|y|; rewards log p(y) and an empty [B, 0]; token-weighted reduction is the MLE."""
    x = _random_inputs()
    x["policy_synthetic_logps"] = x["policy_synthetic_logps"][:, :0]
    out = compute_loss(LossType.SFT, **x)
    torch.testing.assert_close(out.losses, -x["policy_real_logps"] / x["real_lengths"], rtol=0, atol=0)
    torch.testing.assert_close(out.real_rewards, x["policy_real_logps"], rtol=0, atol=0)
    assert out.synthetic_rewards.shape == (4, 0)
    token_mean = (out.losses * x["real_lengths"]).sum() / x["real_lengths"].sum()
    assert_close(token_mean, -x["policy_real_logps"].sum() / x["real_lengths"].sum())
    # sft_loss on token log-probs agrees with the summed form
    token_logps = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, -1.0, -2.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    summed = compute_loss(
        "sft",
        policy_real_logps=(token_logps * mask).sum(-1),
        policy_synthetic_logps=torch.empty(2, 0, dtype=F64),
        real_lengths=mask.sum(-1),
    )
    torch.testing.assert_close(summed.losses, sft_loss(token_logps, mask), rtol=0, atol=1e-15)
