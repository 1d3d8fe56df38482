"""`hyper-ml` (Sheikh et al. 2017): generator batched == looped, one sample per example, learns."""
import copy

import pytest
import torch

from hypersweep.methods import data
from hypersweep.methods.hyper_ml import HyperML
from hypersweep.methods.targets import build_target


def _method(dataset="digits", hidden=(32,), seed=0, **hp):
    splits = data.load(dataset, seed=0)
    net = build_target("mlp", splits.input_shape, splits.n_outputs, hidden=hidden)
    return HyperML(net, splits, {"hyper_hidden": [32, 16], **hp}, seed=seed)


def test_sample_weights_batched_equals_looped():
    m = _method()
    eps = torch.randn(6, m.hp["noise_dim"])
    m.hypernet.eval()
    batched = m.hypernet(eps)
    looped = torch.cat([m.hypernet(eps[i:i + 1]) for i in range(6)])
    assert batched.shape == (6, m.target.spec.flat_size)
    assert torch.allclose(batched, looped, atol=1e-6)
    # Predictions average over samples with one batched evaluation.
    x = m.data["val"][0][:5]
    mean_prob = m.predict(x, batched)
    looped_prob = torch.stack([m.target.forward(batched[i:i + 1], x)[0].softmax(-1) for i in range(6)]).mean(0)
    assert torch.allclose(mean_prob, looped_prob, atol=1e-6)


def test_initial_population_is_a_narrow_cloud_around_one_default_init():
    """As the module docstring says: every weight varies, by about 0.07 x its layer's bound."""
    m = _method(hyper_hidden=[100, 50])  # the default hypernet
    w = m.sample_weights(256, torch.Generator().manual_seed(0)).detach()
    ratio = w.std(0) / m.target.init_bounds()
    assert float(ratio.min()) > 0  # every weight varies across samples
    assert 0.04 < float(ratio.mean()) < 0.1 and float(ratio.max()) < 0.3
    assert m.diagnostics()["noise_scale"] == torch.nn.functional.softplus(m.hypernet.noise_scale).item()


def test_dead_units_of_the_hypernet():
    """`dead_units`: the share of hidden ReLU units that no noise draw activates; a layer whose
    units are all pushed negative is all dead, and the report carries the figure."""
    m = _method()
    alive = m.dead_units()
    assert 0.0 <= alive < 0.5 and m.diagnostics()["dead_units"] == alive
    with torch.no_grad():
        m.hypernet.hidden[1].bias.fill_(-1e3)  # the last hidden layer: its 16 of 32 + 16 units off
    assert m.dead_units() >= 16 / 48
    with torch.no_grad():
        m.hypernet.hidden[0].bias.fill_(-1e3)
    assert m.dead_units() == 1.0


def test_one_weight_sample_per_example():
    for factorised in (0, 1):
        for samples, expected in ((0, (32, (32, 1))), (8, (8, (8, 4)))):
            m = _method(batch_size=32, samples_per_step=samples, factorised=factorised)
            seen = []
            if factorised:  # S = B: without (S, P) weights; S < B: weights built in the dense layer's order
                path = "built_mlp" if samples else "forward_mlp"
                original = getattr(m.hypernet, path)
                setattr(m.hypernet, path, lambda t, h, x, original=original: (
                    seen.append((h.shape[0], x.shape[:2])), original(t, h, x))[1])
            else:
                original = m.target.forward
                m.target.forward = lambda w, x, **kw: (seen.append((w.shape[0], x.shape[:2])), original(w, x, **kw))[1]
            m.train_epoch()
            assert seen[0] == expected  # S samples, each applied to its own B/S examples


def test_learns_digits_and_input_noise_is_learned():
    m = _method(lr=3e-3, batch_size=64)
    start_noise = m.diagnostics()["input_noise"]
    assert abs(start_noise - 0.5) < 1e-6  # the paper's initial scale
    for _ in range(8):
        m.train_epoch()
    val = m.evaluate("val")
    assert val["error"] < 0.08
    assert m.diagnostics()["input_noise"] != start_noise


@pytest.mark.parametrize("samples", [0, 4])
def test_factorised_training_path_equals_built_weights(samples):
    """The MLP paths (S = B: without (S, P) weights; S < B: weights built input-major) give the
    loss and gradients of the target applied to `sample_weights`."""
    grads = {}
    for factorised in (0, 1):
        m = _method(hidden=(16, 12), batch_size=8, samples_per_step=samples, factorised=factorised)
        x, y = m.data["train"][0][:8], m.data["train"][1][:8]
        loss = m.train_batch(x, y)
        loss.backward()
        grads[factorised] = (float(loss), [p.grad.clone() for p in m.hypernet.parameters()])
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_fused_adam_takes_the_same_steps_as_the_default_loop():
    """The generative methods' Adam is PyTorch's fused kernel (issue 15): training follows the
    default implementation's to float32 rounding."""
    fused, plain = _method(), _method()
    assert fused.optim.defaults["fused"]
    plain.optim = torch.optim.Adam(plain.optim.param_groups[0]["params"], lr=plain.hp["lr"])
    assert not plain.optim.defaults["fused"]
    for _ in range(2):
        assert fused.train_epoch() == pytest.approx(plain.train_epoch(), rel=1e-4)
    for a, b in zip(fused.hypernet.parameters(), plain.hypernet.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("samples", [0, 4])
def test_low_rank_output_factorised_path_equals_built_weights(samples):
    """`output_rank` > 0: the factors applied to the inputs (any S) give the loss and gradients
    of the (S, P) weights they generate."""
    grads = {}
    for factorised in (0, 1):
        m = _method(hidden=(16, 12), batch_size=8, samples_per_step=samples, factorised=factorised, output_rank=2)
        x, y = m.data["train"][0][:8], m.data["train"][1][:8]
        loss = m.train_batch(x, y)
        loss.backward()
        grads[factorised] = (float(loss), [p.grad.clone() for p in m.hypernet.parameters()])
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_low_rank_output_is_small_and_starts_with_the_dense_layers_spread():
    """Rank-r blocks per code unit: K r (rows + cols) parameters per matrix; the generated
    weights vary across samples as much as with the paper's dense layer."""
    splits = data.load("digits", seed=0)
    net = build_target("mlp", (784,), 10, hidden=(400, 400))
    dense = HyperML(net, splits, {"hyper_hidden": [100, 50]}, seed=0).hypernet.out
    dense_count = sum(p.numel() for p in dense.parameters())
    low = HyperML(net, splits, {"hyper_hidden": [100, 50], "output_rank": 1}, seed=0).hypernet.out
    assert dense_count == 478_410 * 50
    assert sum(p.numel() for p in low.parameters()) == 50 * ((400 + 784) + (400 + 400) + (10 + 400) + 400 + 400 + 10)
    ratios = []
    for rank in (0, 1, 4):
        m = _method(hyper_hidden=[100, 50], output_rank=rank)
        w = m.sample_weights(512, torch.Generator().manual_seed(0)).detach()
        ratios.append(float((w.std(0) / m.target.init_bounds()).mean()))
    assert 0.04 < ratios[0] < 0.1
    assert ratios[1] == pytest.approx(ratios[0], rel=0.15) and ratios[2] == pytest.approx(ratios[0], rel=0.15)


def test_low_rank_output_builds_cnn_weights():
    """Other targets build their weights from the factors (a conv kernel's block is out x in k k)."""
    splits = data.load("digits", seed=0)
    net = build_target("cnn", splits.input_shape, splits.n_outputs)
    m = HyperML(net, splits, {"hyper_hidden": [16, 8], "output_rank": 2, "batch_size": 16}, seed=0)
    w = m.sample_weights(3, torch.Generator().manual_seed(0))
    assert w.shape == (3, net.spec.flat_size) and float(w.std(0).min()) > 0
    before = float(m.evaluate("val")["loss"])
    for _ in range(2):
        m.train_epoch()
    assert float(m.evaluate("val")["loss"]) < before
    restored = HyperML(net, splits, {"hyper_hidden": [16, 8], "output_rank": 2, "batch_size": 16}, seed=1)
    restored.load_extra_state(m.extra_state())  # a checkpoint carries the factors
    eps = torch.randn(2, m.hp["noise_dim"])
    m.hypernet.eval(), restored.hypernet.eval()
    torch.testing.assert_close(restored.hypernet(eps), m.hypernet(eps))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_dense_output_layer_generates_the_weights_of_its_target_order_draw(kind):
    """The dense layer is stored input-major (for the MLP path's output-side contraction) but
    drawn in the target's order: a seed gives the weights it gave before the layout changed (a
    conv kernel's block too: out x in k k)."""
    splits = data.load("digits", seed=0)
    net = build_target(kind, splits.input_shape, splits.n_outputs, **({"hidden": (32,)} if kind == "mlp" else {}))
    m = HyperML(net, splits, {"hyper_hidden": [100, 50]}, seed=0)
    spec, K = m.target.spec, 50
    A = (torch.rand((spec.flat_size, K), generator=_init_generator(m)) * 2 - 1) / K ** 0.5
    m.hypernet.eval()
    eps = torch.randn(3, m.hp["noise_dim"])
    expected = m.hypernet.base + m.hypernet.bound * (m.hypernet.code(eps) @ A.T)
    torch.testing.assert_close(m.hypernet(eps), expected)


def _init_generator(m):
    """The generator state the output layer was drawn from: replay the base's and the hidden
    layers' draws from the method's init stream."""
    from hypersweep.methods.seeding import Stream, stream_generator
    g = stream_generator(m.seed, Stream.INIT)
    m.target.init_weights(g)
    for layer in m.hypernet.hidden:
        torch.rand(layer.weight.shape, generator=g), torch.rand(layer.bias.shape, generator=g)
    return g


def _as_one_parameter(m, state):
    """`state` as written when the dense output layer was one (P, K) parameter `out.weight` in
    the target's order: the blocks put back in that order, Adam's entries for them merged."""
    spec, K = m.target.spec, m.hypernet.out.K

    def flat(blocks):
        return torch.cat([b.view(b.shape[0], shape[0], K).transpose(0, 1).reshape(-1, K) if len(shape) > 1 else b
                          for b, shape in zip(blocks, spec.shapes)])
    names = [n for n, _ in m.hypernet.named_parameters()]
    first, n = names.index("out.blocks.0"), len(spec.shapes)
    hypernet = {k: v for k, v in state["hypernet"].items() if not k.startswith("out.blocks.")}
    hypernet["out.weight"] = flat([state["hypernet"][f"out.blocks.{i}"] for i in range(n)])
    entries = state["optimizer"]["state"]
    merged = {i if i < first else i - n + 1: e for i, e in entries.items() if not first <= i < first + n}
    merged[first] = {**entries[first], **{k: flat([entries[first + b][k] for b in range(n)])
                                          for k in ("exp_avg", "exp_avg_sq")}}
    groups = [{**g, "params": list(range(len(g["params"]) - n + 1))} for g in state["optimizer"]["param_groups"]]
    return {**state, "hypernet": hypernet, "optimizer": {"state": merged, "param_groups": groups}}


def test_checkpoint_of_the_single_parameter_layer_resumes_the_same_training():
    """A checkpoint written when the dense output layer was one (P, K) parameter in the target's
    order (`out.weight`, one Adam entry) resumes to the same samples and the same next epoch as
    the one it was written from."""
    m = _method(batch_size=64)
    m.train_epoch()
    old = _as_one_parameter(m, copy.deepcopy(m.state_dict()))  # as written to disk: no tensor shared with m
    assert old["hypernet"]["out.weight"].shape == (m.target.spec.flat_size, m.hypernet.out.K)
    resumed = _method(batch_size=64, seed=1)
    resumed.load_state_dict(old)
    eps = torch.randn(4, m.hp["noise_dim"])
    m.hypernet.eval(), resumed.hypernet.eval()
    torch.testing.assert_close(resumed.hypernet(eps), m.hypernet(eps))
    assert resumed.train_epoch() == pytest.approx(m.train_epoch(), rel=1e-5)
    for a, b in zip(resumed.hypernet.parameters(), m.hypernet.parameters(), strict=True):
        torch.testing.assert_close(a, b)
