"""Self-Tuning Networks: best-response layers, range transforms, what each step may change,
exact restore, per-example augmentation, and a task with a known answer."""
import copy
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from hypersweep.methods import data
from hypersweep.methods.augment import color_jitter, cutout
from hypersweep.methods.data import Splits
from hypersweep.methods.stn import STN
from hypersweep.methods.stn_layers import StnConv2d, StnLinear, per_example_dropout
from hypersweep.methods.targets import build_target
from hypersweep.methods.tuned import Space, Tuned


def test_stn_linear_with_zero_hyper_path_is_nn_linear():
    layer = StnLinear(7, 5, 3, zero_bottleneck=True)
    plain = torch.nn.Linear(7, 5)
    with torch.no_grad():
        plain.weight.copy_(layer.weight)
        plain.bias.copy_(layer.bias)
    x, h = torch.randn(4, 7), torch.randn(4, 3)
    assert torch.allclose(layer(x, h), plain(x), atol=1e-6)
    conv = StnConv2d(3, 4, 3, 2, padding=1, zero_bottleneck=True)
    plain_conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        plain_conv.weight.copy_(conv.weight)
        plain_conv.bias.copy_(conv.bias)
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(conv(x, torch.randn(2, 2)), plain_conv(x), atol=1e-6)


def test_hyper_path_scales_rows_per_example():
    layer = StnLinear(4, 3, 2)
    x, h = torch.randn(5, 4), torch.randn(5, 2)
    e = h @ layer.bottleneck.T
    expected = (x @ layer.weight.T + layer.bias) + e[:, :3] * (x @ layer.hyper_weight.T) + e[:, 3:] * layer.hyper_bias
    assert torch.allclose(layer(x, h), expected, atol=1e-6)


def test_range_transforms_are_inverse():
    space = Space([Tuned("p", 0.0, 0.95, 0.05), Tuned("noise", 0.0, math.inf, 0.3),
                   Tuned("length", 0.0, 25.0, 4.0, discrete=True), Tuned("holes", 0.0, 5.0, 1.0, discrete=True)])
    u = torch.randn(100, 4, generator=torch.Generator().manual_seed(0)).clamp(-3, 3) * 2  # float32 sigmoid stays invertible
    assert torch.allclose(space.unproject(space.project(u)), u, atol=1e-3)
    v = torch.tensor([[0.5, 2.0, 12.3, 3.7]])
    assert torch.allclose(space.project(space.unproject(v)), v, atol=1e-5)
    start = space.pipeline(space.project(space.initial()))
    assert start.tolist()[2:] == [4.0, 1.0]  # discrete start values survive the round trip (not 3)
    assert space.pipeline(torch.tensor([[0.5, 2.0, 12.9, 3.2]])).tolist() == [[0.5, 2.0, 12.0, 3.0]]
    with pytest.raises(ValueError, match="inside"):
        Space([Tuned("p", 0.0, 1.0, 1.0)])


def _stn(variant="stn", tune="dropout,input_noise", kind="mlp", seed=0, **hp):
    splits = data.load("digits", seed=0)
    options = {"hidden": [32, 32]} if kind == "mlp" else {"channels": [4, 4], "fc_hidden": 8}
    net = build_target(kind, splits.input_shape, splits.n_outputs, **options)
    return STN(net, splits, {"variant": variant, "tune": tune, "batch_size": 64, "warmup_epochs": 0, **hp}, seed=seed)


@pytest.mark.parametrize("variant", ["stn", "delta-stn"])
def test_validation_step_changes_only_lambda_and_scales(variant):
    m = _stn(variant)
    m.train_epoch()  # moments in every optimiser
    weights = {k: v.clone() for k, v in m.net.state_dict().items()}
    u, s = m.u.detach().clone(), m.s.detach().clone()
    m.val_step()
    assert all(torch.equal(weights[k], v) for k, v in m.net.state_dict().items())
    assert not torch.equal(u, m.u) and not torch.equal(s, m.s)
    m2 = _stn(variant, tune_scales=0)
    s2 = m2.s.detach().clone()
    m2.val_step()
    assert torch.equal(s2, m2.s)


def test_training_step_leaves_lambda_alone_and_delta_starts_at_zero_bottleneck():
    m = _stn("delta-stn")
    assert all(float(layer.bottleneck.abs().max()) == 0 for layer in m.net.layers)
    u, s = m.u.detach().clone(), m.s.detach().clone()
    x, y = m.data["train"][0][:64], m.data["train"][1][:64]
    m.train_step(x, y)
    assert torch.equal(u, m.u) and torch.equal(s, m.s)
    assert any(float(layer.bottleneck.abs().max()) > 0 for layer in m.net.layers)  # the response step moved it


@pytest.mark.parametrize("variant", ["stn", "delta-stn"])
def test_restore_reproduces_the_next_epoch(variant):
    m = _stn(variant, tune="dropout,input_noise,jitter,cutout", kind="cnn")
    m.train_epoch()
    state = copy.deepcopy(m.state_dict())  # what a checkpoint holds: a copy, not live tensors
    m.train_epoch()
    after = m.diagnostics(), m.evaluate("val")
    n = _stn(variant, tune="dropout,input_noise,jitter,cutout", kind="cnn", seed=99)
    n.load_state_dict(state)
    n.train_epoch()
    assert (n.diagnostics(), n.evaluate("val")) == after


def test_per_example_jitter_matches_torchvision_per_image():
    x = torch.rand(5, 3, 8, 8)
    strengths = [torch.rand(5) for _ in range(3)] + [torch.rand(5) * 0.5]
    out = color_jitter(x, *strengths, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    factors = []
    for st in strengths[:3]:
        u = torch.rand(5, generator=g)
        low = (1 - st).clamp_min(0)
        factors.append(low + u * (1 + st - low))
    hue = (torch.rand(5, generator=g) * 2 - 1) * strengths[3]
    for i in range(5):
        ref = TF.adjust_brightness(x[i], float(factors[0][i]))
        ref = TF.adjust_contrast(ref, float(factors[1][i]))
        ref = TF.adjust_saturation(ref, float(factors[2][i]))
        ref = TF.adjust_hue(ref, float(hue[i]))
        assert torch.allclose(out[i], ref, atol=1e-5), i


def test_per_example_cutout_matches_a_loop():
    x = torch.randn(4, 2, 10, 10)
    length, holes = torch.tensor([4.0, 0.0, 6.0, 3.0]), torch.tensor([1.0, 2.0, 2.0, 0.0])
    out = cutout(x, length, holes, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    cy, cx = torch.randint(0, 10, (4, 2), generator=g), torch.randint(0, 10, (4, 2), generator=g)
    for b in range(4):
        ref = x[b].clone()
        half = int(length[b]) // 2
        for j in range(int(holes[b])):
            y0, y1 = max(int(cy[b, j]) - half, 0), min(int(cy[b, j]) + half, 10)
            x0, x1 = max(int(cx[b, j]) - half, 0), min(int(cx[b, j]) + half, 10)
            ref[:, y0:y1, x0:x1] = 0
        assert torch.equal(out[b], ref), b
    assert not torch.equal(out[0], x[0]) and torch.equal(out[1], x[1]) and torch.equal(out[3], x[3])


def test_per_example_dropout_rates():
    x = torch.ones(3, 20000)
    out = per_example_dropout(x, torch.tensor([0.0, 0.3, 0.8]), True, torch.Generator().manual_seed(0))
    dropped = (out == 0).float().mean(1)
    assert dropped[0] == 0 and abs(float(dropped[1]) - 0.3) < 0.02 and abs(float(dropped[2]) - 0.8) < 0.02
    assert torch.allclose(out.mean(1), torch.ones(3), atol=0.05)  # inverted scaling keeps the mean


def _toy(n_train, noise, seed, d=10):
    rng = np.random.default_rng(seed)
    w = np.random.default_rng(123).normal(size=d)

    def sample(n):
        x = rng.normal(size=(n, d)).astype(np.float32)
        y = (np.sin(2 * x @ w / np.sqrt(d)) + noise * rng.normal(size=n)).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    (xt, yt), (xv, yv), (xs, ys) = sample(n_train), sample(500), sample(500)
    m, s = float(yt.mean()), float(yt.std())
    return Splits("toy", "regression", 1, xt, (yt - m) / s, xv, (yv - m) / s, xs, (ys - m) / s, m, s)


def test_stn_raises_regularisation_only_where_it_helps():
    """20 noisy points and a wide MLP: the STN raises dropout and noise from 0.05; 4,000 clean
    points: input dropout stays near its start, and overall regularisation stays well below the
    noisy case. Three seeds, each must show the direction."""
    for seed in range(3):
        learned = {}
        for case, (n, noise) in {"noisy": (20, 1.0), "clean": (4000, 0.0)}.items():
            splits = _toy(n, noise, seed)
            net = build_target("mlp", splits.input_shape, 1, hidden=[128, 128])
            m = STN(net, splits, {"tune": "dropout,input_noise", "batch_size": 32, "lr": 0.01, "hyper_lr": 0.03,
                                  "warmup_epochs": 0, "init_dropout": 0.05, "init_input_noise": 0.05}, seed=seed)
            while m.steps < 1200:
                m.train_epoch()
            learned[case] = {k[3:]: v for k, v in m.diagnostics().items() if k.startswith("hp/")}
        noisy, clean = learned["noisy"], learned["clean"]
        assert noisy["dropout_in"] > 0.3, (seed, learned)
        assert clean["dropout_in"] < 0.08, (seed, learned)
        assert np.mean(list(noisy.values())) > 1.5 * np.mean(list(clean.values())), (seed, learned)


def test_stn_alexnet_on_cifar_shaped_images():
    """The CIFAR net (small fc here) with all 15 hyperparameters: one training and one validation step."""
    x = torch.rand(64, 3, 32, 32)
    y = torch.randint(0, 10, (64,))
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    xs = (x - mean.reshape(1, 3, 1, 1)) / std.reshape(1, 3, 1, 1)
    splits = Splits("cifar-like", "classification", 10, xs, y, xs[:32], y[:32], xs[:32], y[:32],
                    x_mean=mean * 255, x_std=std * 255, x_scale=255.0)
    net = build_target("alexnet", (3, 32, 32), 10, fc_hidden=32)
    m = STN(net, splits, {"tune": "dropout,input_noise,jitter,cutout", "batch_size": 32, "warmup_epochs": 0}, seed=0)
    assert len(m.space) == 15
    u = m.u.detach().clone()
    m.train_epoch()
    assert not torch.equal(u, m.u) and math.isfinite(m.evaluate("val")["loss"])


@pytest.mark.parametrize("kind,variant", [("mlp", "stn"), ("cnn", "delta-stn")])
def test_plain_weights_are_the_net_at_its_hyperparameters(kind, variant):
    """An STN arm's served model: the target with `plain_weights` predicts as the STN evaluates
    (at its current lambda, unperturbed). The STN's hyper path adds to the elementary weights;
    the Delta-STN's is centred at the current lambda, so there its net is the elementary one."""
    from hypersweep.methods.losses import metrics
    m = _stn(variant, tune="dropout,input_noise,cutout" if kind == "cnn" else "dropout,input_noise", kind=kind,
             warmup_epochs=0)
    m.train_epoch()
    with torch.no_grad():
        m.net.layers[0].bottleneck.add_(0.1)  # a non-zero hyper path, also for the Delta-STN
    w = m.plain_weights()
    x, y = m.data["val"]
    served = m.target.forward(w[None], x)[0]
    assert metrics(served, y, m.splits, m.log_noise_std) == pytest.approx(m.evaluate("val"), rel=1e-4, abs=1e-5)
    elementary = torch.cat([t.detach().reshape(-1) for layer in m.net.layers for t in (layer.weight, layer.bias)])
    assert torch.allclose(w, elementary) == (variant == "delta-stn")
