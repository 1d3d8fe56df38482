"""`hyper-hpo` (Lorraine & Duvenaud 2018): which step moves what, batched response net, penalty."""
import pytest
import torch

from hypersweep.methods import data
from hypersweep.methods.hyper_hpo import HyperHPO
from hypersweep.methods.targets import build_target


def _method(kind="mlp", **hp):
    splits = data.load("digits", seed=0)
    options = {"hidden": [16]} if kind == "mlp" else {}
    net = build_target(kind, splits.input_shape, splits.n_outputs, **options)
    return HyperHPO(net, splits, {"hidden": [8], "warmup_epochs": 0, "tune": "weight_decay,input_noise", **hp}, seed=0)


def test_steps_move_only_their_own_parameters():
    m = _method()
    x, y = m.data["train"][0][:64], m.data["train"][1][:64]
    u = m.u.detach().clone()
    net = {k: v.clone() for k, v in m.hypernet.state_dict().items()}
    m.train_step(x, y)
    assert torch.equal(u, m.u) and not torch.equal(net["out.weight"], m.hypernet.out.weight)
    net = {k: v.clone() for k, v in m.hypernet.state_dict().items()}
    m.val_step()
    assert not torch.equal(u, m.u)
    assert all(torch.equal(net[k], v) for k, v in m.hypernet.state_dict().items())


def test_response_net_batched_equals_looped():
    m = _method()
    lam = torch.randn(5, len(m.space))
    batched = m.hypernet(lam)
    looped = torch.cat([m.hypernet(lam[i:i + 1]) for i in range(5)])
    assert torch.allclose(batched, looped, atol=1e-6)


def test_penalty_forms_and_errors():
    m = _method(penalty="l2-unsquared")
    w = torch.full((2, 4), 0.5)
    values = m.space.project(m.u.detach())[None].expand(2, -1)
    wd = 10 ** float(values[0, 0])
    assert m.penalty(w, values).tolist() == pytest.approx([wd * 1.0, wd * 1.0])  # ||w|| = 1
    assert _method().penalty(w, values).tolist() == pytest.approx([wd * 1.0, wd * 1.0])  # ||w||^2 = 1 too
    assert _method().penalty(2 * w, values).tolist() == pytest.approx([4 * wd, 4 * wd])
    assert m.penalty(2 * w, values).tolist() == pytest.approx([2 * wd, 2 * wd])
    with pytest.raises(ValueError, match="MLP targets"):
        _method(kind="cnn")


def test_learns_digits():
    m = _method(lr=3e-3)
    for _ in range(6):
        m.train_epoch()
    assert m.evaluate("val")["error"] < 0.1
    assert set(m.diagnostics()) == {"hp/log10_weight_decay", "hp/input_noise", "hp/weight_decay"}
