"""Ensemble tasks run where the compute is (a Ray task on a worker, or in-process): restore a
trained trial from its checkpoint and draw members from it, and evaluate sets of weight vectors.
Inputs and outputs are plain dicts and numpy arrays, so they travel through Ray unchanged."""
from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from ray import tune

from hypersweep.methods.ensembles import evaluate_ensemble, polyak_average, supports_gauge_fix
from hypersweep.workers.base import CHECKPOINT_FILE, build_method, build_target_for, load_splits, worker_device


def sample_members(config: dict[str, Any], checkpoint: tune.Checkpoint, k: int | None, sample_seed: int
                   ) -> dict[str, Any]:
    """Members from one trained trial: k weight samples of a generative method (from a
    generator seeded with `sample_seed`; k None: as many as its evaluation averages,
    `eval_samples`), or the trained net itself (one member) otherwise.
    `checkpoint` may live on any filesystem Tune reads. Returns weights (n, P) float32 and
    the regression noise scale of each."""
    device = worker_device(config.get("device", "auto"))
    _, target, method = build_method(config, device)
    try:
        with checkpoint.as_directory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (torch's note on a foreign pickle protocol: the error below says it)
            state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location=device, weights_only=True)
        method.load_state_dict(state)
    except Exception as e:  # cut, edited or foreign (a pickle payload is refused by weights_only): one line
        raise ValueError(f"{checkpoint.path}/{CHECKPOINT_FILE}: not a checkpoint of this trial written by "
                         f"hypersweep ({type(e).__name__})") from None
    with torch.no_grad():
        if method.generative:
            weights = method.sample_weights(k or int(method.hp["eval_samples"]), torch.Generator(device=device).manual_seed(sample_seed))
        elif hasattr(method, "plain_weights"):  # the STN: its net at the hyperparameters it ended with
            weights = method.plain_weights()[None]
        else:
            weights = target.flat_weights(method.module)[None]
    log_std = float(method.log_noise_std.detach())
    return {"weights": weights.float().cpu().numpy(), "log_noise_std": np.full(len(weights), log_std, np.float32)}


def evaluate_weights(config: dict[str, Any], weights: np.ndarray, log_noise_std: np.ndarray | None = None,
                     splits: tuple[str, ...] = ("val", "test")) -> dict[str, dict[str, Any]]:
    """evaluate_ensemble on each split for weights (K, P) of the config's target."""
    device = worker_device(config.get("device", "auto"))
    data = load_splits(config)
    target = build_target_for(config, data)
    w = torch.as_tensor(weights, device=device)
    log_std = torch.as_tensor(log_noise_std, device=device) if log_noise_std is not None else None
    return {split: evaluate_ensemble(target, data, w, split, log_std) for split in splits}


def distill_weights(config: dict[str, Any], weights: np.ndarray, log_noise_std: np.ndarray | None = None
                    ) -> dict[str, dict[str, Any]]:
    """Polyak averages of the members (raw and, where defined, gauge-fixed), each evaluated:
    {kind: {"weights": (P,), "val": metrics, "test": metrics}, "spec": {"names", "shapes"}}."""
    data = load_splits(config)
    target = build_target_for(config, data)
    w = torch.as_tensor(weights)
    kinds = ["raw"] + (["gauge"] if supports_gauge_fix(target) else [])
    out: dict[str, Any] = {"spec": {"names": list(target.spec.names), "shapes": [list(s) for s in target.spec.shapes]}}
    for kind in kinds:
        avg = polyak_average(target, w, gauge=kind == "gauge", centre_logits=data.task == "classification")
        noise = None if log_noise_std is None else np.array([float(np.mean(log_noise_std))], np.float32)
        out[kind] = {"weights": avg.numpy(), **evaluate_weights(config, avg[None].numpy(), noise)}
    return out


def served_model(config: dict[str, Any], weights: np.ndarray, log_noise_std: np.ndarray | None = None,
                 examples: int = 5) -> tuple[torch.nn.Module, np.ndarray, dict[str, dict[str, Any]]]:
    """The members' mean prediction as one torch module (methods/served.py), on the CPU and in
    eval mode; an input example (the first `examples` test rows); and hypersweep's own
    evaluation of the same weights on val and test (`evaluate_weights`)."""
    from hypersweep.methods.served import ServedNet
    data = load_splits(config)
    target = build_target_for(config, data)
    nets = []
    for w in torch.as_tensor(np.asarray(weights, np.float32)):
        net = target.module()
        target.load_flat(net, w)
        nets.append(net)
    served = ServedNet(nets, data.task, data.y_mean, data.y_std).eval()
    example = data.x_test[:examples].float().cpu().numpy()
    return served, example, evaluate_weights({**config, "device": "cpu"}, weights, log_noise_std)
