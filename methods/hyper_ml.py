"""`hyper-ml`: stochastic maximum likelihood through a hypernetwork (Sheikh et al. 2017).

eps ~ N(0, I) -> scaled by a learned softplus unit (init 1.0) -> MLP hypernet (ReLU, dropout
0.5 on its hidden units while training) -> flat target weights w = g(eps). The training loss is
the likelihood of each example under its own weight sample (the paper's Eq. 3: one sample per
example), done as S samples x B/S examples each, S = B by default. Gaussian noise with a learned
softplus scale (init 0.5) is added to the inputs while training. Prediction is the mean over S
test samples (probabilities for classification, means for regression; Eq. 4).

The hypernet's output layer is `w = base + bound * (A h)`: `base` starts at a PyTorch-default
draw of the target's weights and `bound` is each target layer's 1/sqrt(fan_in). `bound` scales
the noise per layer; it is not the spread. At the defaults the samples start as a narrow cloud
around that one draw: each weight's std across samples is about 0.07 x its layer's bound (0.061-
0.069 measured on the digits and 784-400-400-10 MLPs), an eighth of an independent default
init's std (0.58 x bound). The likelihood then concentrates the cloud (the paper's Figure 2,
logged as `weight_std`; `dead_units` tells a collapse by dead hypernet units apart).

A is kept as one input-major block per target tensor (`DenseOutput`) for the MLP paths; it is
drawn in the target's order, so a seed gives the weights it gave before, and a checkpoint of the
earlier single (P, K) parameter (`out.weight`) is converted when loaded, Adam's moments too.

`output_rank` r > 0 replaces the dense output layer by `LowRankOutput` (not the paper's layer:
an option for speed; its accuracy beside the dense layer's: bench/results/fidelity.md).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hypersweep.methods.generative import GenerativeMethod
from hypersweep.methods.hparams import HParam
from hypersweep.methods.losses import task_loss
from hypersweep.methods.targets import MLP, ParamSpec, TargetNet, sample_dropout
from hypersweep.methods.tuned import inv_softplus


def hyperparameters(n_dropout_sites: int) -> dict[str, HParam]:
    hps = [
        HParam("lr", 1e-3, 1e-8, 1.0, doc="Adam learning rate of the hypernet"),
        HParam("weight_decay", 0.0, 0.0, 1.0),
        HParam("batch_size", 256, 1, 1 << 20, kind=int),
        HParam("samples_per_step", 0, 0, 1 << 20, kind=int, doc="S weight samples per step; 0: one per example"),
        HParam("noise_dim", 10, 1, 4096, kind=int),
        HParam("hyper_hidden", [100, 50], 1, 1 << 16, kind=list, doc="hidden sizes of the hypernet"),
        HParam("hyper_dropout", 0.5, 0.0, 0.95),
        HParam("noise_scale_init", 1.0, 1e-4, 100.0, doc="softplus scale of eps, learned"),
        HParam("input_noise_init", 0.5, 1e-4, 10.0, doc="softplus scale of input noise, learned"),
        HParam("eval_samples", 16, 1, 4096, kind=int),
        HParam("factorised", 1, 0, 1, kind=int, doc="MLP targets' fast paths: no (S, P) weights (S = B, or low "
               "rank), else weights in the layer's order"),
        HParam("output_rank", 0, 0, 4096, kind=int,
               doc="0: the paper's dense output layer; r > 0: rank-r blocks per code unit (LowRankOutput)"),
    ]
    return {hp.name: hp for hp in hps}


def _uniform(shape: tuple[int, ...], bound: float, generator: torch.Generator) -> nn.Parameter:
    return nn.Parameter((torch.rand(shape, generator=generator) * 2 - 1) * bound)


def _dense_apply(A_in: torch.Tensor, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sum_k h_k A_k z for a dense block stored input-major, A_in (in, out * K): z A_in holds
    every A_k z (out x K numbers per example, one GEMM on A as stored), then each example's
    are contracted with its sample's code. h (S, K), z (S, n, in) -> (S, n, out)."""
    S, K = h.shape
    n = z.shape[1]
    per_code = (z @ A_in).view(S, n * (A_in.shape[1] // K), K)
    return torch.bmm(per_code, h.unsqueeze(-1)).view(S, n, -1)


class DenseOutput(nn.Module):
    """The paper's output layer A (P, K), U(+-1/sqrt(K)), as one parameter per target tensor:
    a weight matrix's block (rows, cols...) input-major, as (cols, rows * K); a vector's as (size,
    K). Input-major, the MLP paths contract their inputs with a block as stored (`apply`) and
    take a built block as W^T (`built`); one parameter per block, the backward leaves each
    block's gradient where it is made (one (P, K) parameter split per step had its gradient
    concatenated: 7 % of the S = B = 256 step). A is drawn as one (P, K) draw in the target's
    order, as before the blocks, so a seed gives the weights it gave then."""

    def __init__(self, spec: ParamSpec, K: int, generator: torch.Generator):
        super().__init__()
        self.spec, self.K = spec, K
        drawn = _uniform((spec.flat_size, K), 1.0 / math.sqrt(K), generator).detach()
        self.blocks = nn.ParameterList(self.blocks_of(spec, drawn))

    @staticmethod
    def blocks_of(spec: ParamSpec, flat: torch.Tensor) -> list[torch.Tensor]:
        """A (P, K) tensor in the target's order (the layer, or Adam's moments of it, as one
        parameter) -> the blocks, new tensors."""
        blocks = []
        for part, shape in zip(torch.split(flat, spec.sizes), spec.shapes):
            if len(shape) > 1:  # (rows, cols, K) -> (cols, rows, K)
                blocks.append(part.unflatten(0, (shape[0], -1)).transpose(0, 1).reshape(-1, shape[0] * flat.shape[1]))
            else:
                blocks.append(part.clone())
        return blocks

    def block(self, i: int) -> tuple[torch.Tensor, ...]:
        return (self.blocks[i],)

    def apply(self, i: int, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sum_k h_k A_k z for matrix i: h (S, K), z (S, n, cols) -> (S, n, rows)."""
        return _dense_apply(self.blocks[i], h, z)

    def built(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Tensor i's part of A h: (S, cols, rows), W^T, for a matrix; (S, size) for a vector."""
        A = self.blocks[i]
        generated = h @ A.view(-1, self.K).T
        return generated.view(len(h), A.shape[0], -1) if len(self.spec.shapes[i]) > 1 else generated

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """A h: (S, K) -> (S, P) in the target's order."""
        parts = (self.built(i, h) for i in range(len(self.blocks)))
        return torch.cat([p.transpose(1, 2).reshape(len(h), -1) if p.dim() == 3 else p for p in parts], 1)


class LowRankOutput(nn.Module):
    """The output layer A (P, K) with each weight matrix's block (rows x cols) of rank `rank`
    per code unit k: A h = sum_k h_k U_k V_k^T = U diag(h (x) 1_r) V^T, U (rows, K r), V (cols,
    K r); vectors (biases) keep dense (size, K) blocks. K r (rows + cols) parameters per matrix
    instead of K rows cols (784-400-400-10, K = 50, r = 1: 0.16 M against 23.9 M), and W z is
    (z V) scaled by the code, then U: no per-sample weights whatever S is. U and V are drawn
    U(+-(3 / (K r))^(1/4)), so each generated weight's variance at init is the dense layer's
    (sum_k h_k^2 / 3K)."""

    def __init__(self, spec: ParamSpec, K: int, rank: int, generator: torch.Generator):
        super().__init__()
        self.rank = rank
        factor_bound = (3.0 / (K * rank)) ** 0.25
        # per tensor in spec order: [U, V] for a matrix, [A] for a vector
        self.blocks = nn.ModuleList(nn.ParameterList(
            [_uniform((shape[0], K * rank), factor_bound, generator),
             _uniform((math.prod(shape[1:]), K * rank), factor_bound, generator)] if len(shape) > 1
            else [_uniform((shape[0], K), 1.0 / math.sqrt(K), generator)]) for shape in spec.shapes)

    def block(self, i: int) -> tuple[torch.Tensor, ...]:
        """Tensor i's parameters: (U, V) or (A,)."""
        return tuple(self.blocks[i])

    def apply(self, i: int, h: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sum_k h_k A_k z for matrix i: h (S, K), z (S, n, cols) -> (S, n, rows)."""
        U, V = self.block(i)
        return ((z @ V) * h.repeat_interleave(self.rank, 1).unsqueeze(1)) @ U.T

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """A h: (S, K) -> (S, P)."""
        code = h.repeat_interleave(self.rank, 1).unsqueeze(1)  # (S, 1, K r)
        parts = []
        for block in self.blocks:
            if len(block) == 2:  # a matrix: U, V
                parts.append((block[0] * code) @ block[1].T)  # (S, rows, cols)
            else:
                parts.append(h @ block[0].T)  # (S, size)
        return torch.cat([p.reshape(len(h), -1) for p in parts], 1)


class HyperNet(nn.Module):
    """eps (S, noise_dim) -> flat target weights (S, P)."""

    def __init__(self, target: TargetNet, noise_dim: int, hidden: list[int], dropout: float,
                 noise_scale_init: float, generator: torch.Generator, output_rank: int = 0):
        super().__init__()
        dims = [noise_dim, *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.base = nn.Parameter(target.init_weights(generator))
        self.register_buffer("bound", target.init_bounds())
        self.noise_scale = nn.Parameter(torch.tensor(inv_softplus(noise_scale_init)))
        self.dropout, self.noise_dim, self.output_rank = dropout, noise_dim, output_rank
        with torch.no_grad():  # explicit-generator init, as for the target
            for layer in self.hidden:
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound)
                layer.bias.copy_((torch.rand(layer.bias.shape, generator=generator) * 2 - 1) * bound)
        self.out = (LowRankOutput(target.spec, dims[-1], output_rank, generator) if output_rank
                    else DenseOutput(target.spec, dims[-1], generator))

    def code(self, eps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The last hidden layer h (S, K); the weights are base + bound * (A h)."""
        h = F.softplus(self.noise_scale) * eps
        for layer in self.hidden:
            h = sample_dropout(torch.relu(layer(h)), self.dropout, self.training, generator)
        return h

    def forward(self, eps: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.base + self.bound * self.out(self.code(eps, generator))

    def forward_mlp(self, target: MLP, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The MLP target with the weights of codes h (S, K) on x (S, n, ...), without building
        the (S, P) weights. Per layer W_s = B + bound * reshape(A h_s), so
        W_s x = B x + bound * sum_k h_sk (A_k x): one GEMM of the inputs with A (stored input-major,
        (in, out * K)), then a contraction of its B x out x K numbers with the codes, replaces S x P
        generated weights and S matrix-vector products (shared notes: performance-notes.md). The
        input side, A (out, in * K) on the outer products x (x) h_s, does the same FLOPs on B x in x K
        numbers with slower GEMMs: its step took 1.15 to 1.3 times this one's (784-400-400-10,
        S = B = 256, 2 cores, steps timed in turn). A `LowRankOutput` applies its factors instead
        (B x (in + out) x K r)."""
        S = h.shape[0]
        # One split (its backward is one concatenation; slicing would zero-fill a P-sized
        # gradient per slice).
        base, bounds = (torch.split(t, target.spec.sizes) for t in (self.base, self.bound))
        z = x.reshape(S, x.shape[1], -1)
        n_layers = len(target.dims) - 1
        for i, (d_in, d_out) in enumerate(zip(target.dims[:-1], target.dims[1:])):
            w0, b0 = base[2 * i], base[2 * i + 1]
            bound = bounds[2 * i][0]  # one init bound per layer (weights and bias)
            A_wz, A_b = self.out.apply(2 * i, h, z), self.out.block(2 * i + 1)[0]
            y = z @ w0.reshape(d_out, d_in).T + bound * A_wz
            z = y + (b0 + bound * (h @ A_b.T)).unsqueeze(1)
            if i < n_layers - 1:
                z = torch.relu(z)
        return z

    def built_mlp(self, target: MLP, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The MLP target with the (S, P) weights of codes h (S, K) on x (S, n, ...), built as
        the dense layer's blocks are stored: each layer's W^T (S, in, out) is used as it is made,
        never put back in the target's order (a copy of S x P numbers)."""
        S = h.shape[0]
        base, bounds = (torch.split(t, target.spec.sizes) for t in (self.base, self.bound))
        z = x.reshape(S, x.shape[1], -1)
        n_layers = len(target.dims) - 1
        for i, (d_in, d_out) in enumerate(zip(target.dims[:-1], target.dims[1:])):
            bound = bounds[2 * i][0]
            w_t = base[2 * i].view(d_out, d_in).T + bound * self.out.built(2 * i, h)
            b = base[2 * i + 1] + bound * self.out.built(2 * i + 1, h)
            z = torch.baddbmm(b.unsqueeze(1), z, w_t)
            if i < n_layers - 1:
                z = torch.relu(z)
        return z


class HyperML(GenerativeMethod):
    hyperparameters = staticmethod(hyperparameters)

    def build(self, target: TargetNet, generator: torch.Generator) -> list[torch.Tensor]:
        self.hypernet = HyperNet(target, self.hp["noise_dim"], list(self.hp["hyper_hidden"]), self.hp["hyper_dropout"],
                                 self.hp["noise_scale_init"], generator, self.hp["output_rank"]).to(self.device)
        self.input_noise = torch.tensor(inv_softplus(self.hp["input_noise_init"]), device=self.device,
                                        requires_grad=True)
        return [*self.hypernet.parameters(), self.input_noise]

    def optimizer(self, params):
        return self.adam(params, lr=self.hp["lr"], weight_decay=self.hp["weight_decay"])

    def sample_weights(self, k: int, generator: torch.Generator, training: bool = False) -> torch.Tensor:
        """(k, P) weight vectors; without dropout unless `training`."""
        self.hypernet.train(training)
        eps = torch.randn(k, self.hp["noise_dim"], generator=generator, device=self.device)
        return self.hypernet(eps, generator)

    def train_batch(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = len(x)
        S = math.gcd(self.hp["samples_per_step"] or B, B)  # S samples x B/S examples; exact for a short last batch
        x = x + F.softplus(self.input_noise) * torch.randn(x.shape, generator=self.noise_gen, device=self.device)
        x = x.reshape(S, B // S, *x.shape[1:])
        # The factorised path costs B x in x out x K per layer whatever S is; building the weights
        # costs S x in x out x K (+ B x in x out to apply them): it pays only at one sample per
        # example. With low-rank blocks it costs B x (in + out) x K r: always the cheaper.
        if isinstance(self.target, MLP) and self.hp["factorised"]:
            self.hypernet.train(True)
            eps = torch.randn(S, self.hp["noise_dim"], generator=self.noise_gen, device=self.device)
            code = self.hypernet.code(eps, self.noise_gen)
            if S == B or self.hp["output_rank"]:
                out = self.hypernet.forward_mlp(self.target, code, x)
            else:  # the dense layer's weights, built in its own order
                out = self.hypernet.built_mlp(self.target, code, x)
        else:
            out = self.target.forward(self.sample_weights(S, self.noise_gen, training=True), x)  # (S, B/S, out)
        return task_loss(out, y.reshape(S, B // S), self.splits.task, self.log_noise_std)

    @torch.no_grad()
    def dead_units(self, samples: int = 256) -> float:
        """Share of the hypernet's hidden ReLU units that no one of `samples` noise draws
        activates (eval mode: no dropout). Dead units carry no noise to the weights, so a
        population that collapsed because its units died is told apart from one the likelihood
        concentrated."""
        self.hypernet.eval()
        h = F.softplus(self.hypernet.noise_scale) * torch.randn(samples, self.hp["noise_dim"],
                                                                generator=self.eval_generator(), device=self.device)
        dead = total = 0
        for layer in self.hypernet.hidden:
            h = torch.relu(layer(h))
            dead += int((h.amax(0) <= 0).sum())
            total += h.shape[1]
        return dead / total

    @torch.no_grad()
    def diagnostics(self) -> dict[str, float]:
        return {**super().diagnostics(), "input_noise": float(F.softplus(self.input_noise)),
                "noise_scale": float(F.softplus(self.hypernet.noise_scale)), "dead_units": self.dead_units()}

    def extra_state(self) -> dict[str, Any]:
        return {"hypernet": self.hypernet.state_dict(), "input_noise": self.input_noise.detach().clone()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        hypernet = state["hypernet"]
        if "out.weight" in hypernet:  # written when the dense layer was one (P, K) parameter
            blocks = DenseOutput.blocks_of(self.target.spec, hypernet["out.weight"])
            hypernet = {**{k: v for k, v in hypernet.items() if k != "out.weight"},
                        **{f"out.blocks.{i}": block for i, block in enumerate(blocks)}}
        self.hypernet.load_state_dict(hypernet)
        with torch.no_grad():
            self.input_noise.copy_(state["input_noise"])

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "out.weight" in state["hypernet"]:
            state = {**state, "optimizer": self._optimizer_state_of_blocks(state["optimizer"])}
        super().load_state_dict(state)

    def _optimizer_state_of_blocks(self, saved: Mapping[str, Any]) -> dict[str, Any]:
        """Adam's state from when the dense layer was one (P, K) parameter: that parameter's
        entry becomes one per block (its moments split as the layer is), later ones shift."""
        first = [name for name, _ in self.hypernet.named_parameters()].index("out.blocks.0")
        n = len(self.hypernet.out.blocks)
        flat = (self.target.spec.flat_size, self.hypernet.out.K)  # the layer's moments (exp_avg, exp_avg_sq, ...)

        def indices(i: int) -> list[int]:
            return list(range(first, first + n)) if i == first else [i if i < first else i + n - 1]
        state = {}
        for i, entry in saved["state"].items():
            if i != first:
                state[indices(i)[0]] = entry
                continue
            moments = {k: DenseOutput.blocks_of(self.target.spec, v) for k, v in entry.items()
                       if torch.is_tensor(v) and tuple(v.shape) == flat}
            step = entry.get("step")  # one tensor per block: fused Adam adds to each in place
            for b, index in enumerate(indices(i)):
                state[index] = {**entry, **{k: v[b] for k, v in moments.items()},
                                **({"step": step.clone()} if torch.is_tensor(step) else {})}
        groups = [{**g, "params": [j for i in g["params"] for j in indices(i)]} for g in saved["param_groups"]]
        return {"state": state, "param_groups": groups}


METHOD = HyperML
