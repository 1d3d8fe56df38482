"""What every benchmark shares: the machine description, timing, and the results files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    import torch
    return {"cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `fn` over `repeats` runs after `warmup` runs (seconds)."""
    for _ in range(warmup):
        fn()
        sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """This machine's dense float32 matmul throughput: the compute bound."""
    import torch
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = torch.cuda.synchronize if device != "cpu" else (lambda: None)
    t = median_time(lambda: torch.mm(a, b), repeats, sync=sync)
    return 2 * n ** 3 / t / 1e9


def write(name: str, payload: dict[str, Any], table: str, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "command": command, "machine": machine(),
               "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **payload}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str))
    m = payload["machine"]
    header = (f"# {name}\n\n`{command}` on {m['cpu_count']} cores, torch {m['torch']} ({m['torch_threads']} threads)"
              f"{', ' + m['cuda'] if m['cuda'] else ''}, {payload['date_utc']}.\n\n")
    (RESULTS / f"{name}.md").write_text(header + table)
    return RESULTS / f"{name}.md"


def md_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no rows)\n"
    keys = list(rows[0])
    fmt = (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]) + "\n"
