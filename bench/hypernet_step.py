"""Time per training step of the hypernetwork methods and the STN, against three references
measured in the same run:
  (a) the matmul bound: the step's floating-point work (torch's FlopCounterMode) divided by this
      machine's dense matmul throughput (torch.mm, 2048 x 2048, timed between the row's own steps,
      since it drifts) -> "fraction of the bound";
  (b) a plain loop over the S weight samples, one generated weight vector and one
      torch.func.functional_call each, as the reference code and libraries do -> speed-up;
  (c) one plain sgd step on the same target and batch -> cost ratio.
Targets: the MLP 784-400-400-10 and the small CNN (20,018 weights), MNIST-shaped batches of
256, S = 1, 8, 32, 256 weight samples per step (the STN always has one hyperparameter sample
per example). Each configuration runs in its own process, so its peak memory is its own.

    python -m bench.run hypernet_step            (or: python -m bench.hypernet_step)
"""
from __future__ import annotations

import json
import re
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from bench.common import matmul_gflops, md_table, median_time, write

METHODS = ("hyper-ml", "hyper-ml rank 1", "hyper-diverse", "hyper-diverse compiled", "hyper-posterior", "stn")
# Rows of a method with options other than its defaults: name -> (method, hyperparameters)
VARIANTS = {"hyper-ml rank 1": ("hyper-ml", {"output_rank": 1}),  # not the paper's layer: fidelity.md checks it
            "hyper-diverse compiled": ("hyper-diverse", {"compile_entropy": 1})}  # same numerics (a test)
TARGETS = {"mlp": {"kind": "mlp", "hidden": [400, 400]}, "cnn": {"kind": "cnn", "channels": [32, 16], "fc_hidden": 8}}
SAMPLES = (1, 8, 32, 256)
BATCH = 256
LOOP_MAX_S = 32  # the loop reference gets slow beyond this; its target is at S = 32


def _splits():
    from hypersweep.methods import data
    return data.load("mnist-5k", seed=0)


def _base(name: str) -> str:
    """The method a row runs (a variant's name is not a method's)."""
    return VARIANTS.get(name, (name, {}))[0]


def _options(name: str) -> dict[str, Any]:
    """A row's hyperparameters beside the method's defaults."""
    return VARIANTS.get(name, (name, {}))[1]


def _method(name: str, target, splits, S: int):
    from hypersweep.methods import method_module
    name, options = _base(name), _options(name)
    hp = {"hyper-ml": {"batch_size": BATCH, "samples_per_step": S},
          "hyper-diverse": {"noise_batch": max(S, 2), "image_batch": BATCH // max(S, 2)},
          "hyper-posterior": {"batch_size": BATCH, "samples_per_step": S},
          "stn": {"batch_size": BATCH, "warmup_epochs": 0},
          "sgd": {"batch_size": BATCH}}[name]
    return method_module(name).METHOD(target, splits, {**hp, **options}, seed=0)


def _step_fn(name: str, m, x, y):
    if name == "stn":
        return lambda: m.train_step(x, y)
    if name == "sgd":
        def step():
            loss = m.loss(m.module(x), y)
            m.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            m.optimizer.step()
        return step

    def step():
        loss = m.train_batch(x, y)
        m.optim.zero_grad(set_to_none=True)
        loss.backward()
        m.optim.step()
    return step


def _loop_fn(name: str, m, x, y, S: int):
    """The reference way: for each sample, generate its weights and run the module on its share
    of the batch through functional_call; one backward over the summed loss."""
    from torch.func import functional_call

    from hypersweep.methods.losses import task_loss
    module = m.target.module().train()
    B = len(x)
    diverse = _base(name) == "hyper-diverse"
    n = max(S, 2) if diverse else S
    per = B // n

    def step():
        losses, ws = [], []
        for s in range(n):
            w = m.sample_weights(1, m.noise_gen, training=True)  # (1, P)
            ws.append(w)
            params = {k: v[0] for k, v in m.target.spec.unflatten(w).items()}
            out = functional_call(module, params, (x[s * per:(s + 1) * per],))
            losses.append(task_loss(out, y[s * per:(s + 1) * per], m.splits.task, m.log_noise_std))
        loss = torch.stack(losses).mean()
        if diverse:
            loss = m.hp["lambda_"] * loss - m.entropy(torch.cat(ws))
        m.optim.zero_grad(set_to_none=True)
        loss.backward()
        m.optim.step()
    return step


def measure_one(name: str, target_key: str, S: int) -> dict[str, Any]:
    """One configuration, in this process: step time, flops, loop and memory."""
    import psutil
    from torch.utils.flop_counter import FlopCounterMode

    m, x, y = _configured(name, target_key, S)
    step = _step_fn(name, m, x, y)
    rss_before = psutil.Process().memory_info().rss
    step()
    # A compiled variant's first step compiles, and the process peak is the compiler's: not shown.
    compiled = bool(_options(name).get("compile_entropy"))
    peak = None if compiled else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    t, bound = _beside_the_bound(step)
    out = {"method": name, "target": target_key, "S": S if name != "stn" else "per example", "step_s": t,
           "matmul_gflops": bound, "gflop": flops / 1e9,
           "step_peak_mb": None if peak is None else max(0, peak - rss_before) / 2 ** 20}
    if (_base(name), target_key, S, _options(name)) == ("hyper-ml", "mlp", BATCH, {}):
        out["own_gemms_fraction"] = _own_gemms_fraction(m)
    if name != "stn" and S <= LOOP_MAX_S:
        out["loop_s"] = median_time(_loop_fn(name, m, x, y, S), repeats=3)
    if _base(name) == "hyper-diverse":
        out["entropy_s"] = median_time(_entropy_fn(m, S), repeats=3)
    return out


def _beside_the_bound(fn, repeats: int = 5, n: int = 2048) -> tuple[float, float]:
    """Median time of `fn` and this machine's matmul bound (torch.mm n x n, GFLOP/s) timed
    between its runs: the bound drifts on this shared machine (100 to 188 GFLOP/s in one minute,
    2026-12-04), so a row's fraction is of the bound at its own time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    times, bounds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        bounds.append(2 * n ** 3 / (time.perf_counter() - start) / 1e9)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), statistics.median(bounds)


def _own_gemms_fraction(m) -> float:
    """hyper-ml's factorised MLP step (S = B) does nearly all its FLOPs in three GEMMs per layer
    on A stored input-major (x A, x^T G, G A^T); their throughput alone at the step's shapes, as a
    fraction of the bound timed beside them, is about the most the step's fraction can be (the
    rest, the base weights' GEMMs and the codes' bmm, is small): the ceiling of that goal."""
    K, dims = m.hypernet.out.K, m.target.dims
    mats = [(torch.randn(BATCH, d_in), torch.randn(d_in, d_out * K), torch.randn(BATCH, d_out * K))
            for d_in, d_out in zip(dims[:-1], dims[1:])]

    def gemms():
        for x, A, G in mats:
            x @ A, x.T @ G, G @ A.T
    flops = sum(3 * 2 * x.shape[0] * A.shape[0] * A.shape[1] for x, A, _ in mats)
    gemms()
    t, bound = _beside_the_bound(gemms)
    return flops / t / 1e9 / bound


def _entropy_fn(m, S: int):
    """hyper-diverse's entropy term alone, forward and backward: gauge fixing and the
    Kozachenko-Leonenko estimate on S sampled weight vectors (a leaf). Both the step and the
    loop compute it once per step, so it bounds the step's speed-up over the loop."""
    w = m.sample_weights(max(S, 2), m.noise_gen, training=True).detach().requires_grad_()

    def entropy():
        w.grad = None
        m.entropy(w).backward()
    return entropy


def measure_profile(name: str, target_key: str, S: int, steps: int = 3, top: int = 8) -> dict[str, Any]:
    """Where one configuration's step spends its time: torch.profiler's operators by self CPU
    time over `steps` steps, the `top` of them with their share and calls per step."""
    from torch.profiler import ProfilerActivity, profile

    step = _step_fn(name, *_configured(name, target_key, S))
    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops) or 1
    return {"method": name, "target": target_key, "S": S,
            "ops": [{"op": e.key, "self_share": e.self_cpu_time_total / total, "calls_per_step": e.count / steps}
                    for e in ops[:top]]}


# The goals (issue 15): (method, target, S) -> (figure, "<=" or ">=", value)
GOALS = {("hyper-ml", "mlp", 256): ("fraction_of_matmul_bound", ">=", 0.70),
         ("hyper-ml", "mlp", 1): ("cost_vs_sgd_step", "<=", 5.0),
         ("hyper-ml rank 1", "mlp", 1): ("cost_vs_sgd_step", "<=", 5.0),
         **{(m, "mlp", 32): ("speedup_vs_loop", ">=", 5.0) for m in ("hyper-diverse", "hyper-diverse compiled")},
         **{(m, "cnn", 32): ("speedup_vs_loop", ">=", 3.0) for m in ("hyper-ml", "hyper-diverse", "hyper-posterior")}}


# What a missed goal's profile has shown, and the next fix (read from the runs' profiles by hand;
# the generated shares beside it say whether a new run still shows it).
NEXT_FIX = {
    ("hyper-ml", "mlp", 1): "the paper's dense output layer: A h and its gradient g h^T (`mm`) and Adam and "
    "zero_grad over its 24 M parameters; the layer's own floor. `output_rank` 1 meets the goal (its row); for the "
    "dense layer, nothing short of a different layer.",
    ("hyper-ml", "mlp", 256): "the output-side contraction's GEMMs (`mm`: x A on A stored input-major, one "
    "parameter per target tensor), the contraction of their B x out x K numbers with the codes (`bmm`) and Adam "
    "over the 24 M parameters. The step's GEMMs alone reach the ceiling column's fraction at these shapes; what "
    "is left outside them is memory-bound passes (codes, Adam, freeing the gradients). Next: nothing short of a "
    "different layer (the `hyper-ml rank 1` row) or lower precision, which changes the numbers.",
    ("hyper-diverse", "mlp", 32): "the entropy term (`entropy_s` in the JSON), which the loop pays too: gauge "
    "fixing's elementwise passes (`mul`, `div`) and the L1 neighbour search in cache-sized blocks (`sub`, `fill_`, "
    "`copy_`); `cat` is the generator's flat (S, P) output and the target's split of it. The next row fuses "
    "gauge fixing and the chosen pairs' distances (`compile_entropy` 1). The ceiling is below 5: the loop "
    "computes the same entropy, so no cost of the step beyond it reaches the goal.",
    ("hyper-diverse compiled", "mlp", 32): "the compiled gauge fixing and distances (`CompiledFxGraph`), the "
    "eager neighbour search in blocks (`sub`, `fill_`, `copy_`, `sum`) and the generator's GEMMs (`mm`). The loop "
    "uses the same compiled entropy, so the speed-up's ceiling stays below 5: a cheaper entropy helps both.",
    **{(m, "cnn", 32): "the target's own convolutions and pooling (`convolution_backward`, `mkldnn_convolution`, "
       "`max_pool2d`); the ceiling is below 3, so no hypernet-side fix reaches the goal on this CPU."
       for m in ("hyper-ml", "hyper-diverse", "hyper-posterior")},
}


def missed_goals(rows: list[dict[str, Any]]) -> list[tuple[dict[str, Any], tuple[str, str, float]]]:
    out = []
    for r in rows:
        goal = GOALS.get((r["method"], r["target"], r["S"]))
        if goal is None:
            continue
        value = r.get(goal[0])
        if value is None or (value < goal[2] if goal[1] == ">=" else value > goal[2]):
            out.append((r, goal))
    return out


def measure_sgd(target_key: str) -> dict[str, Any]:
    return {"target": target_key, "sgd_step_s": median_time(_step_fn("sgd", *_configured("sgd", target_key, 1)),
                                                            repeats=10)}


def _configured(name: str, target_key: str, S: int):
    """(method, x, y): `name` on target `target_key` at S samples, and one MNIST-shaped batch."""
    from hypersweep.methods.targets import build_target
    torch.manual_seed(0)
    splits = _splits()
    opts = dict(TARGETS[target_key])
    target = build_target(opts.pop("kind"), splits.input_shape, splits.n_outputs, **opts)
    return _method(name, target, splits, S), splits.x_train[:BATCH], splits.y_train[:BATCH]


def _in_subprocess(args: list[str], mode: str = "--one") -> dict[str, Any]:
    res = subprocess.run([sys.executable, "-m", "bench.hypernet_step", mode, *args], capture_output=True, text=True)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--render":
        rerender()
        return
    if argv and argv[0] in ("--one", "--profile"):
        name, target_key, S = argv[1], argv[2], int(argv[3])
        if argv[0] == "--profile":
            result = measure_profile(name, target_key, S)
        else:
            result = measure_sgd(target_key) if name == "sgd" else measure_one(name, target_key, S)
        print(json.dumps(result))
        return
    bound = matmul_gflops()
    rows = []
    for target_key in TARGETS:
        sgd = _in_subprocess(["sgd", target_key, "1"])
        for name in METHODS:
            for S in (SAMPLES if name != "stn" else (BATCH,)):
                r = _in_subprocess([name, target_key, str(S)])
                if "error" in r:
                    rows.append({"method": name, "target": target_key, "S": S, "error": r["error"]})
                    continue
                r["gflop_per_s"] = r["gflop"] / r["step_s"]
                r["fraction_of_matmul_bound"] = r["gflop_per_s"] / r["matmul_gflops"]
                r["speedup_vs_loop"] = r["loop_s"] / r["step_s"] if "loop_s" in r else None
                r["cost_vs_sgd_step"] = r["step_s"] / sgd["sgd_step_s"] if "sgd_step_s" in sgd else None
                rows.append(r)
                print(json.dumps(r), flush=True)
    profiles = [_in_subprocess([r["method"], r["target"], str(r["S"])], "--profile") for r, _ in missed_goals(rows)]
    path = write("hypernet_step", {"matmul_gflops": bound, "batch": BATCH, "rows": rows, "profiles": profiles},
                 render(rows, bound, profiles), "python -m bench.run hypernet_step")
    print(path.read_text())


# torch's FlopCounterMode counts a grouped convolution (one group per weight sample) as if every
# group saw all input channels: about S times too much. Those rows get no FLOP-based figures.
GROUPED_CONV = {(m, "cnn") for m in ("hyper-ml", "hyper-ml rank 1", "hyper-diverse", "hyper-diverse compiled")}


def render(rows: list[dict[str, Any]], bound: float, profiles: list[dict[str, Any]] = ()) -> str:
    table_rows = []
    for r in rows:
        grouped = (r["method"], r["target"]) in GROUPED_CONV
        na = "n/a (grouped conv)" if grouped else ""
        table_rows.append({
            "method": r["method"], "target": r["target"], "S": r["S"],
            "step (ms)": 1e3 * r["step_s"] if "step_s" in r else r.get("error", ""),
            "GFLOP/step": na or r.get("gflop", ""), "GFLOP/s": na or r.get("gflop_per_s", ""),
            "of matmul bound": na or r.get("fraction_of_matmul_bound", ""),
            "loop (ms)": 1e3 * r["loop_s"] if r.get("loop_s") else "-",
            "speed-up vs loop": r.get("speedup_vs_loop") or "-", "x sgd step": r.get("cost_vs_sgd_step") or "-",
            "entropy alone (ms)": 1e3 * r["entropy_s"] if r.get("entropy_s") else "-",
            "step peak (MB)": "n/a (compiler)" if r.get("step_peak_mb", "") is None else r.get("step_peak_mb", "")})
    own = [r["matmul_gflops"] for r in rows if r.get("matmul_gflops")]
    beside = (f"; timed between each row's own steps, as its fraction uses: median {statistics.median(own):.0f}, "
              f"{min(own):.0f} to {max(own):.0f}" if own else "")
    return (f"Matmul bound (torch.mm 2048x2048 float32) at the start: {bound:.1f} GFLOP/s{beside}. Batch {BATCH}. "
            "Goals: the section below. FLOPs from torch's FlopCounterMode (matmuls and convolutions; cdist and "
            "elementwise work are not counted; grouped convolutions are overcounted, so those rows show n/a).\n\n"
            + md_table(table_rows)
            + _goals_text(rows, profiles))


def _goals_text(rows: list[dict[str, Any]], profiles: list[dict[str, Any]]) -> str:
    """The issue's goals, met or not, and for each missed one where its step's time goes."""
    lines = ["", "## Goals (issue 15)", "", "Ceiling: for a speed-up over the loop, the loop's time over one sgd step "
             "on the same batch, plus for hyper-diverse its entropy term alone (`entropy_s`: gauge fixing and the "
             "estimator, forward and backward, which the loop computes too): the speed-up of a hypernet step that "
             "cost nothing beyond them. For the fraction of the matmul bound, the fraction the step's own GEMMs "
             "reach alone at its shapes (`own_gemms_fraction`).", "",
             "| method | target | S | figure | goal | measured | ceiling | met |", "|---|---|---|---|---|---|---|---|"]
    missed = {(r["method"], r["target"], r["S"]) for r, _ in missed_goals(rows)}
    for r in rows:
        key = (r["method"], r["target"], r["S"])
        if key in GOALS:
            figure, op, value = GOALS[key]
            measured = r.get(figure)
            ceiling = None
            if figure == "fraction_of_matmul_bound":
                ceiling = r.get("own_gemms_fraction")
            if figure == "speedup_vs_loop" and r.get("speedup_vs_loop") and r.get("cost_vs_sgd_step"):
                sgd_s = r["step_s"] / r["cost_vs_sgd_step"]
                ceiling = r["loop_s"] / (sgd_s + r.get("entropy_s", 0.0))
            lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {figure} | {op} {value:g} | "
                         f"{'-' if measured is None else f'{measured:.3g}'} | "
                         f"{'-' if ceiling is None else f'{ceiling:.3g}'} | {'no' if key in missed else 'yes'} |")
    if profiles:
        lines += ["", "Where the time of the rows that miss their goal goes (torch.profiler, self CPU time of "
                  "3 steps, the top operators with their share and calls per step):", ""]
        for p in profiles:
            if "ops" not in p:
                continue
            ops = ", ".join(f"`{_op_name(o['op'])}` {100 * o['self_share']:.0f} % ({o['calls_per_step']:g}/step)"
                            for o in p["ops"])
            fix = NEXT_FIX.get((p["method"], p["target"], p["S"]))
            lines.append(f"- {p['method']}, {p['target']}, S = {p['S']}: {ops}" + (f". Reading: {fix}" if fix else ""))
    return "\n".join(lines) + "\n"


def _op_name(op: str) -> str:
    """A profiler operator's name without a compiled graph's hash (`## Call CompiledFxGraph f3x... ##`)."""
    return re.sub(r"## Call CompiledFxGraph \w+ ##", "CompiledFxGraph", op)


def rerender() -> None:
    """Rewrite hypernet_step.md from the JSON of the last run (after a change of presentation)."""
    import json as _json

    from bench.common import RESULTS
    data = _json.loads((RESULTS / "hypernet_step.json").read_text())
    header = "\n\n".join((RESULTS / "hypernet_step.md").read_text().split("\n\n")[:2])  # title, machine
    (RESULTS / "hypernet_step.md").write_text(header + "\n\n" + render(data["rows"], data["matmul_gflops"],
                                                                       data.get("profiles", [])))


if __name__ == "__main__":
    main()
