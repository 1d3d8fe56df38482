"""Gauge fixing keeps the function and normalises scales; the entropy estimator is calibrated."""
import math

import pytest
import torch

from hypersweep.methods.diversity import gauge_fix, kozachenko_leonenko, log_unit_ball_volume, neighbours
from hypersweep.methods.targets import MLP, SmallCNN

TARGETS = {"mlp": lambda: MLP((12,), (9, 7), 5), "cnn": lambda: SmallCNN((1, 12, 12), 4, channels=(6, 5), fc_hidden=7)}


@pytest.mark.parametrize("kind", TARGETS)
def test_gauge_fixing_keeps_outputs_and_sets_scales_to_one(kind):
    net = TARGETS[kind]()
    g = torch.Generator().manual_seed(0)
    # Random per-neuron rescalings make the raw scales far from 1.
    w = torch.stack([net.init_weights(g) * (0.2 + 3 * torch.rand(1, generator=g)) for _ in range(4)]).double()
    x = torch.randn(6, *net.input_shape, generator=g).double()
    fixed, scales = gauge_fix(net, w, return_scales=True)
    out, out_fixed = net.forward(w, x), net.forward(fixed, x)
    # Softmax outputs are unchanged; logits move only by the per-sample constant of the bias mean.
    assert torch.allclose(out.softmax(-1), out_fixed.softmax(-1), atol=1e-5)
    assert torch.allclose(out - out.mean(-1, keepdim=True), out_fixed - out_fixed.mean(-1, keepdim=True), atol=1e-5)
    exact = gauge_fix(net, w, eps=0.0)
    assert torch.allclose(net.forward(exact, x).softmax(-1), out.softmax(-1), atol=1e-5)
    refixed, rescales = gauge_fix(net, exact, eps=0.0, return_scales=True)
    for s in rescales:
        assert torch.allclose(s, torch.ones_like(s), atol=1e-10)  # every hidden neuron at scale 1
    assert torch.allclose(refixed, exact, atol=1e-10)  # idempotent
    # The reference's eps only matters for tiny neurons (mean square near 1e-6 here): within 1e-2.
    assert max(float((s - 1).abs().max()) for s in gauge_fix(net, fixed, return_scales=True)[1]) < 1e-2
    last_bias = net.spec.unflatten(fixed)[net.spec.names[-1]]
    assert torch.allclose(last_bias.mean(-1), torch.zeros(4, dtype=torch.double), atol=1e-10)
    assert any(not torch.allclose(s, torch.ones_like(s), atol=0.1) for s in scales)  # it did something


def test_unit_ball_volumes():
    assert math.isclose(math.exp(log_unit_ball_volume(2, 2)), math.pi)
    assert math.isclose(math.exp(log_unit_ball_volume(3, 2)), 4 / 3 * math.pi)
    assert math.isclose(math.exp(log_unit_ball_volume(2, 1)), 2.0)  # the L1 diamond
    assert math.isclose(math.exp(log_unit_ball_volume(3, 1)), 8 / 6)


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_entropy_of_gaussian_within_10_percent(p):
    d, n = 4, 2000
    g = torch.Generator().manual_seed(1)
    a = torch.randn(d, d, generator=g, dtype=torch.double)
    cov = a @ a.T + 2.0 * torch.eye(d, dtype=torch.double)
    samples = torch.randn(n, d, generator=g, dtype=torch.double) @ torch.linalg.cholesky(cov).T
    analytic = 0.5 * (d * math.log(2 * math.pi * math.e) + float(torch.logdet(cov)))
    estimate = float(kozachenko_leonenko(samples, p=p))
    assert abs(estimate - analytic) < 0.1 * abs(analytic), (estimate, analytic)


def test_entropy_grows_with_spread_and_has_gradients():
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(2))
    h1, h2 = kozachenko_leonenko(x), kozachenko_leonenko(3 * x)
    assert float(h2 - h1) == pytest.approx(10 * math.log(3), rel=1e-4)  # d * log(scale)
    y = x.clone().requires_grad_()
    kozachenko_leonenko(y, dim=300, constants=False).backward()
    assert torch.isfinite(y.grad).all() and float(y.grad.abs().sum()) > 0


@pytest.mark.parametrize("p", [1.0, 2.0])
@pytest.mark.parametrize("k", [1, 3])
def test_entropy_differentiating_only_the_chosen_pairs_equals_the_full_distance_matrix(p, k):
    """The N x N search runs without autograd (issue 15): value and gradient are those of the
    earlier path, which differentiated cdist over every pair and top-k."""
    def full_matrix(samples):
        N, d = samples.shape
        dist = torch.cdist(samples, samples, p=p) + torch.diag(torch.full((N,), math.inf, dtype=samples.dtype))
        rho = dist.topk(k, dim=1, largest=False).values[:, -1]
        return 300 * torch.log(rho + 1e-8).mean() + torch.special.digamma(torch.tensor(float(N)))

    x = torch.randn(32, 5000, generator=torch.Generator().manual_seed(3), dtype=torch.double)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    new, old = kozachenko_leonenko(a, p=p, k=k, dim=300, constants=False), full_matrix(b)
    new.backward()
    old.backward()
    assert float(new) == pytest.approx(float(old), rel=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_l1_neighbour_search_over_blocks_of_the_weight_axis():
    """The L1 search sums distances over cache-sized blocks of the weight axis (issue 15):
    several blocks and a short last one find cdist's neighbours."""
    x = torch.randn(8, 2 * ((1 << 20) // 8) + 37, generator=torch.Generator().manual_seed(5))
    dist = torch.cdist(x.double(), x.double(), p=1).fill_diagonal_(math.inf)
    assert torch.equal(neighbours(x, p=1), dist.argmin(1))
    assert torch.equal(neighbours(x, p=1, k=3), dist.topk(3, dim=1, largest=False).indices[:, -1])


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_entropy_of_gauge_fixed_parts_equals_that_of_the_concatenation(kind, p):
    """hyper-diverse's entropy runs on the gauge-fixed parameter tensors as parts, without the
    (S, P) concatenation (issue 15): same neighbours, value and gradient as the flat path."""
    net = TARGETS[kind]()
    w = 0.3 * torch.randn(16, net.spec.flat_size, generator=torch.Generator().manual_seed(7), dtype=torch.double)
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    parts = gauge_fix(net, a, flat=False)
    assert [part.shape[1] for part in parts] == list(net.spec.sizes)
    flat = gauge_fix(net, b)
    assert torch.equal(neighbours(parts, p=p, k=2), neighbours(flat, p=p, k=2))
    new = kozachenko_leonenko(parts, p=p, k=2, dim=12, constants=False)
    old = kozachenko_leonenko(flat, p=p, k=2, dim=12, constants=False)
    new.backward()
    old.backward()
    assert float(new) == pytest.approx(float(old), rel=1e-12)
    assert torch.allclose(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_l1_neighbour_search_over_parts_wider_than_a_block():
    """Parts are searched block by block each: a part spanning several blocks, a short one."""
    x = torch.randn(8, 3 * ((1 << 20) // 8) + 11, generator=torch.Generator().manual_seed(6))
    parts = [x[:, :5], x[:, 5:2 * ((1 << 20) // 8) + 40], x[:, 2 * ((1 << 20) // 8) + 40:]]
    dist = torch.cdist(x.double(), x.double(), p=1).fill_diagonal_(math.inf)
    assert torch.equal(neighbours(parts, p=1), dist.argmin(1))
    with pytest.raises(ValueError, match="no samples"):
        neighbours([], p=1)
