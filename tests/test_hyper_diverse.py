"""`hyper-diverse` (Deutsch et al. 2019): shared per-layer generators, batched == looped,
entropy on gauge-fixed weights, and training moves the weights towards the task."""
import pytest
import torch

from hypersweep.methods import data
from hypersweep.methods.diversity import gauge_fix, kozachenko_leonenko
from hypersweep.methods.hyper_diverse import HyperDiverse, PooledNorm, hyperparameters
from hypersweep.methods.targets import build_target

SMALL = {"noise_batch": 8, "image_batch": 16, "latent_dim": 12, "code_dim": 5, "extractor_hidden": [24],
         "first_generator_hidden": [16, 16], "generator_hidden": [16, 16], "last_generator_hidden": [16, 16]}


def _method(model="mlp", **hp):
    splits = data.load("digits", seed=0)
    options = {"hidden": (16, 8)} if model == "mlp" else {"channels": (4, 3), "fc_hidden": 5}
    net = build_target(model, splits.input_shape, splits.n_outputs, **options)
    return HyperDiverse(net, splits, {**SMALL, **hp}, seed=0)


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_generator_batched_equals_looped_and_shares_weights_across_neurons(model):
    m = _method(model)
    g = m.generator.eval()
    z = m.latent(5, torch.Generator().manual_seed(1))
    w = g(z)
    assert w.shape == (5, m.target.spec.flat_size)
    assert torch.allclose(w, torch.cat([g(z[i:i + 1]) for i in range(5)]), atol=1e-6)
    # One generator per layer, whatever the number of neurons: the hypernet is far smaller per
    # neuron than the target layer it generates.
    assert len(m.generator.generators) == len(m.target.spec.names) // 2
    x = m.data["val"][0][:6]
    probs = m.predict(x, w)
    looped = torch.stack([m.target.forward(w[i:i + 1], x)[0].softmax(-1) for i in range(5)]).mean(0)
    assert torch.allclose(probs, looped, atol=1e-6)


def test_loss_uses_gauge_fixed_entropy_over_the_latent_dimension():
    m = _method(lambda_=0.0)  # loss = -H alone
    x, y = m.data["train"][0][:128], m.data["train"][1][:128]
    gen_state = m.noise_gen.get_state()
    loss = m.train_batch(x, y)
    m.noise_gen.set_state(gen_state)
    w = m.sample_weights(8, m.noise_gen, training=True)
    expected = -kozachenko_leonenko(gauge_fix(m.target, w), p=1, dim=12, constants=False)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    raw = -kozachenko_leonenko(w, p=1, dim=12, constants=False)
    assert float(raw) != pytest.approx(float(expected), rel=1e-3)


@pytest.mark.parametrize("model", ["mlp", pytest.param("cnn", marks=pytest.mark.slow)])
def test_compiled_entropy_equals_the_eager_one(model):
    """`compile_entropy` runs gauge fixing and the distances through torch.compile (issue 15):
    the same loss and generator gradients as the eager path, within float32 rounding (~20 s of
    compilation a case on 2 cores, so the CNN's runs with the slow tests)."""
    losses, grads = [], []
    for compiled in (0, 1):
        m = _method(model, compile_entropy=compiled)
        x, y = m.data["train"][0][:128], m.data["train"][1][:128]
        loss = m.train_batch(x, y)
        loss.backward()
        losses.append(float(loss))
        grads.append(torch.cat([p.grad.flatten() for p in m.generator.parameters()]))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-4, atol=1e-6 * float(grads[0].abs().max()))


def test_latent_choices():
    u = _method().latent(1000, torch.Generator().manual_seed(0))
    assert float(u.min()) >= -1 and float(u.max()) <= 1
    n = _method(latent="normal").latent(1000, torch.Generator().manual_seed(0))
    assert float(n.min()) < -2
    with pytest.raises(ValueError, match="hyperparameter 'latent'"):
        _method(latent="cauchy")


def test_the_reference_setting_is_the_default():
    hp = {name: h.default for name, h in hyperparameters(0).items()}
    assert hp["batch_norm"] == 1 and hp["init_scale"] == 0.01 and hp["extractor_hidden"] == [300, 300]
    assert (hp["first_generator_hidden"], hp["generator_hidden"], hp["last_generator_hidden"]) == \
        ([40, 40], [100, 100], [60, 60])
    assert hp["lambda_"] == 1e3 and hp["lambda_rate"] == 1.0
    m = _method(model="cnn", first_generator_hidden=[7], generator_hidden=[9, 9], last_generator_hidden=[11])
    widths = [[layer.out_features for layer in g.layers[:-1]] for g in m.generator.generators]
    assert widths == [[7], [9, 9], [9, 9], [11]]  # conv, conv, fc, last
    norms = [n for g in m.generator.generators for n in g.norms]
    assert norms and all(isinstance(n, PooledNorm) and n.weight.requires_grad for n in norms)


def test_pooled_norm_statistics_are_bias_corrected_and_pooled_over_leading_axes():
    norm = PooledNorm(3)
    h = torch.randn(4, 5, 3) * torch.tensor([1.0, 2.0, 3.0]) + torch.tensor([5.0, -1.0, 0.0])
    out = norm.train()(h)
    flat = out.reshape(-1, 3)  # normalised over the 20 pooled rows, not per leading index
    assert torch.allclose(flat.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(flat.var(0, unbiased=False), torch.ones(3), atol=1e-4)
    # After one step, evaluation uses that step's statistics (not 2% of them blended into a
    # zero or (0, 1) start): the same batch normalises the same way in eval mode.
    assert torch.allclose(norm.eval()(h), out, atol=1e-5)
    other = torch.randn(4, 5, 3) * 4
    norm.train()(other)
    # Two steps: the corrected average weighs the second batch 1/(1 + 0.98) and the first 0.98/(1 + 0.98).
    mean = (0.98 * h.reshape(-1, 3).mean(0) + other.reshape(-1, 3).mean(0)) / 1.98
    assert torch.allclose(norm.running_mean / (1 - 0.98 ** 2), mean, atol=1e-5)
    # With no statistics yet, eval mode uses (0, 1): a sample's output never depends on the batch.
    fresh = PooledNorm(3).eval()
    assert torch.equal(fresh(h), h)


def test_generated_weights_start_at_a_trainable_scale_with_batch_norm_and_not_without():
    # Why batch norm is the default: at the reference's 0.1^2 variance scaling, each hypernet
    # layer without it shrinks the signal ~10x and the weights start near 1e-4.
    with_bn = _method().sample_weights(8, torch.Generator().manual_seed(0)).abs().mean()
    without = _method(batch_norm=0).sample_weights(8, torch.Generator().manual_seed(0)).abs().mean()
    assert 0.02 < float(with_bn) < 0.5 and float(without) < 1e-3


def test_lambda_anneals_up_to_its_cap_and_survives_a_checkpoint():
    m = _method(lambda_=10.0, lambda_rate=2.0, lambda_max=50.0)
    x, y = m.data["train"][0][:128], m.data["train"][1][:128]
    for expected in (20.0, 40.0, 50.0, 50.0):
        loss = m.train_batch(x, y)
        m.optim.zero_grad()
        loss.backward()
        m.optim.step()
        m.scheduler_step()
        assert m.lambda_ == expected
    fresh = _method(lambda_=10.0, lambda_rate=2.0, lambda_max=50.0)
    fresh.load_extra_state(m.extra_state())
    assert fresh.lambda_ == 50.0 and fresh.diagnostics()["lambda"] == 50.0


def test_training_lowers_the_task_loss():
    m = _method(lr=3e-3, noise_batch=8, image_batch=32)
    before = m.evaluate("val")["loss"]
    for _ in range(15):
        m.train_epoch()
    assert m.evaluate("val")["loss"] < before - 0.1
    assert m.diagnostics()["entropy"] == m.last_entropy


def test_a_checkpoint_that_does_not_fit_says_which_hyperparameters_differ():
    """A trial restored into a method configured otherwise (a default changed by an upgrade,
    for a study recorded before studies pinned them) fails with the differing values, or with
    what to do when the checkpoint predates recorded hyperparameters."""
    from hypersweep.workers.base import CheckpointMismatch, load_method_state
    saved = _method(batch_norm=0)
    state = dict(saved.state_dict(), hp=dict(saved.hp))
    with pytest.raises(CheckpointMismatch, match=r"ckpt: .*batch_norm: 0 saved, 1 now"):
        load_method_state(_method(batch_norm=1), state, "ckpt")
    state.pop("hp")
    with pytest.raises(CheckpointMismatch, match="saved without its hyperparameters.*study.yaml"):
        load_method_state(_method(batch_norm=1), state, "ckpt")
    fits = _method(batch_norm=0)
    load_method_state(fits, dict(saved.state_dict(), hp=dict(saved.hp)), "ckpt")  # the same setting loads
