"""Target nets: the batched functional path equals a loop over samples and equals the module."""
import pytest
import torch

from hypersweep.methods.targets import MLP, SmallCNN, WideResNet, build_target, rank1_shapes, rank1_weights

NETS = {
    "mlp": lambda: MLP((1, 8, 8), (32, 16), 10),
    "mlp-tabular": lambda: MLP((13,), (50,), 1),
    "cnn-mnist": lambda: SmallCNN((1, 28, 28), 10),
    "cnn-rgb": lambda: SmallCNN((3, 16, 16), 10, channels=(8, 4), fc_hidden=6),
    "resnet": lambda: WideResNet((3, 16, 16), 10, depth=10, width=1, norm_groups=4),
}


def _weights(net, S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([net.init_weights(g) for _ in range(S)])


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("per_sample_x", [False, True])
def test_batched_equals_loop(kind, per_sample_x):
    net = NETS[kind]()
    S, B = 5, 7
    w = _weights(net, S)
    x = torch.randn(S, B, *net.input_shape) if per_sample_x else torch.randn(B, *net.input_shape)
    out = net.forward(w, x)
    assert out.shape == (S, B, net.n_outputs)
    loop = torch.stack([net.forward(w[s:s + 1], x[s] if per_sample_x else x)[0] for s in range(S)])
    assert torch.allclose(out, loop, atol=1e-5)
    # ...and equals the nn.Module loaded with each sample's weights.
    module = net.module().eval()
    for s in range(S):
        net.load_flat(module, w[s])
        assert torch.allclose(out[s], module(x[s] if per_sample_x else x), atol=1e-5)


@pytest.mark.parametrize("kind", NETS)
def test_module_and_functional_agree_in_training_mode(kind):
    """Same generator state, same dropout masks and input noise (S = 1)."""
    net = NETS[kind]()
    w = _weights(net, 1, seed=3)
    x = torch.randn(6, *net.input_shape)
    rates = [0.2] + [0.5] * (net.n_dropout_sites - 1)
    module = net.module().train()
    net.load_flat(module, w[0])
    module.reg.configure(dropout=rates, input_noise=0.3, generator=torch.Generator().manual_seed(11))
    a = module(x)
    b = net.forward(w, x, dropout=rates, input_noise=0.3, training=True,
                    generator=torch.Generator().manual_seed(11))[0]
    assert torch.allclose(a, b, atol=1e-5)
    c = net.forward(w, x, dropout=rates, input_noise=0.3, training=True,
                    generator=torch.Generator().manual_seed(12))[0]
    assert not torch.allclose(a, c)  # and the randomness is real


@pytest.mark.parametrize("kind", NETS)
@pytest.mark.parametrize("per_sample_x", [False, True])
def test_rank1_path_equals_built_weights(kind, per_sample_x):
    """forward_rank1 (modulations applied to activations) == forward on the built weights."""
    net = NETS[kind]()
    S, B = 3, 4
    g = torch.Generator().manual_seed(5)
    base = net.init_weights(g)
    rows = {n: 1 + 0.3 * torch.randn(S, r, generator=g) for n, (r, c) in rank1_shapes(net.spec).items()}
    cols = {n: 1 + 0.3 * torch.randn(S, c, generator=g) for n, (r, c) in rank1_shapes(net.spec).items()}
    x = torch.randn(S, B, *net.input_shape) if per_sample_x else torch.randn(B, *net.input_shape)
    built = rank1_weights(net.spec, base, rows, cols)
    first = net.spec.unflatten(built)[net.spec.names[0]]
    assert torch.allclose(first[1], net.spec.unflatten(base[None])[net.spec.names[0]][0]
                          * rows[net.spec.names[0]][1].reshape(-1, *(1,) * (first.dim() - 2))
                          * cols[net.spec.names[0]][1].reshape(1, -1, *(1,) * (first.dim() - 3)))
    assert torch.allclose(net.forward_rank1(base, rows, cols, x), net.forward(built, x), atol=1e-5)


def test_resnet_shapes_and_init():
    net = WideResNet((3, 32, 32), 10, depth=16, width=4)
    assert net.spec.flat_size == 2748890  # WRN-16-4 without conv biases, GroupNorm affine included
    w = net.spec.unflatten(net.init_weights(torch.Generator().manual_seed(0))[None])
    assert torch.equal(w["blocks.0.norm1.weight"], torch.ones(1, 16)) and float(w["norm.bias"].abs().max()) == 0
    assert "blocks.0.shortcut.weight" in w and "blocks.1.shortcut.weight" not in w
    with pytest.raises(ValueError, match="6n \\+ 4"):
        WideResNet((3, 32, 32), 10, depth=20)


def test_gradients_flow_through_weights():
    net = NETS["cnn-mnist"]()
    w = _weights(net, 3).requires_grad_()
    net.forward(w, torch.randn(4, 1, 28, 28)).sum().backward()
    assert w.grad.shape == w.shape and bool((w.grad.abs().sum(1) > 0).all())


def test_parameter_spec():
    assert SmallCNN((1, 28, 28), 10).spec.flat_size == 20018  # 832 + 12,816 + 6,280 + 90 (Deutsch et al.)
    assert MLP((784,), (400, 400), 10).spec.flat_size == 478410
    net = NETS["mlp"]()
    w = _weights(net, 2)
    assert torch.equal(net.spec.flatten(net.spec.unflatten(w)), w)
    module = net.module()
    net.load_flat(module, w[1])
    assert torch.equal(net.flat_weights(module), w[1])


def test_init_is_pytorch_default_scale_and_seeded():
    net = MLP((100,), (50,), 10)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a, b = net.init_weights(g1), net.init_weights(g2)
    assert torch.equal(a, b)
    first = net.spec.unflatten(a[None])["layers.0.weight"]
    assert float(first.abs().max()) <= 0.1 and float(first.abs().max()) > 0.09  # U(+-1/sqrt(100))


def test_build_target_errors():
    with pytest.raises(ValueError, match="unknown model .rnn.; valid: alexnet, cnn, mlp, resnet"):
        build_target("rnn", (10,), 2)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_target("cnn", (10,), 2)
