"""Malformed study files, as a careless or hostile user writes them: each one is exit code 2 and
one line on stderr naming the file and the key, no traceback, nothing created, within 5 s and
1 GB. The corpus (over 200 files) covers every key of a study with values of the wrong type,
out of range, not finite, too long or too many, plus YAML and encoding abuse (duplicate keys,
deep nesting, alias bombs, non-UTF-8, a huge file)."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

BASE = {
    "name": "fuzz", "seed": 1, "seeds": 1,
    "dataset": {"name": "digits", "val_fraction": 0.2, "test_fraction": 0.2},
    "model": {"kind": "mlp", "hidden": [16]},
    "arms": [
        {"name": "fixed", "method": "sgd", "search": "fixed", "params": {"lr": 0.05}, "max_epochs": 5},
        {"name": "rand", "method": "sgd", "search": "random", "num_samples": 2, "scheduler": "asha",
         "scheduler_options": {"grace_period": 1, "reduction_factor": 2},
         "space": {"lr": {"loguniform": [0.01, 0.2]}}, "ensemble": {"members": 2, "distill": "polyak"}},
    ],
    "budget": {"seconds": 5, "workers": 1, "cpus_per_worker": 1, "gpus_per_worker": 0, "schedule": "sequential"},
    "training": {"max_epochs": 10, "epochs_per_step": 1, "checkpoint_every": 2, "max_failures": 1,
                 "device": "auto"},
    "tracking": {"uri": None, "experiment": "fuzz"},
}

LONG = "x" * 300
NAN, INF = float("nan"), float("inf")
NOT_NUMBERS = ["five", [1], {"a": 1}, True]
COUNTS = [0, -1, 10 ** 12, 2.5, NAN, *NOT_NUMBERS]  # whole numbers >= 1 with an upper bound
REALS = [NAN, INF, -INF, "x", [0.1]]

# key path -> values that must be refused (the key is named in the error)
BAD: dict[str, list] = {
    "name": ["", LONG, "-lead", "a/b", "a b", "../up", None, 5, ["x"], "é"],
    "seed": [-1, 2 ** 64, 1.5, "one", None, NAN],
    "seeds": [*COUNTS, 10 ** 6],
    "dataset": ["digits", None, [1]],
    "dataset.name": ["nope", "uci:../../etc/passwd", "uci:", LONG, 3, None],
    "dataset.val_fraction": [0, 1, -0.1, 1.5, *REALS],
    "dataset.test_fraction": [0, 1, NAN, "x"],
    "dataset.root": [5, ["a"], "r" * 5000],
    "model": ["mlp", [1]],
    "model.kind": ["transformer", 3, None],
    "model.hidden": [[0], [-5], [10 ** 12], [1.5], ["a"], "16", [16] * 100, 16],
    "model.fc_hidden": [0, -1, 10 ** 9, "8"],
    "model.depth": [9, 10 ** 6, "16"],
    "model.width": [0, 1000],
    "model.norm_groups": [0, 10 ** 6],
    "arms": [[], "fixed", None, {"name": "x"}, [BASE["arms"][0]] * 101],
    "arms[0]": ["x", None, 3],
    "arms[0].name": ["", LONG, "with space", "-x", None, 1],
    "arms[0].method": ["nope", None, 5, LONG],
    "arms[0].search": ["nope", 5, {"replay": 5}, {"other": "x"}],
    "arms[0].params": ["lr", [1], {"nope": 1}, {"lr": "fast"}, {"lr": -1}, {"lr": NAN}],
    "arms[0].params.lr": [-1, 0, "fast", None, NAN, INF],
    "arms[0].num_samples": [*COUNTS, 10 ** 6],
    "arms[0].max_epochs": [0, -3, 10 ** 9, "5", NAN],
    "arms[0].scheduler": ["pbt2", 3],
    "arms[1].space": ["lr", [1], {"nope": {"uniform": [0, 1]}}, {"lr": {"uniform": [0.5, 0.1]}},
                      {"lr": {"loguniform": [-1, 1]}}, {"lr": {"gauss": [0, 1]}}, {"lr": {"uniform": [0, 1, 2]}},
                      {"lr": {"uniform": [NAN, 1]}}, {"lr": {"choice": []}}, {"lr": {"choice": [0.1] * 20000}},
                      {"lr": [0.1, 0.2]}, {"batch_size": {"uniform": [16, 64]}}, {"lr": {"grid": [0.1, 0.2]}},
                      {f"k{i}": {"uniform": [0, 1]} for i in range(70)}],
    "arms[1].space.lr": [{"uniform": "x"}, {"int": [0.5, 2]}, None, 0.1, {"uniform": [0, INF]}],
    "arms[1].num_samples": [0, -2, 10 ** 6, "2"],
    "arms[1].scheduler": ["hyperband", None, 1],
    "arms[1].scheduler_options": ["x", {"grace_period": -5}, {"grace_period": NAN}, {"reduction_factor": 1},
                                  {"unknown": 1}, {"grace_period": "one"}],
    "arms[1].scheduler_options.grace_period": [0, -5, NAN, INF, "1"],
    "arms[1].scheduler_options.reduction_factor": [1, 0, -2, NAN, INF],
    "arms[1].ensemble": ["yes", 5, {"members": 1}, {"members": 10 ** 9}, {"distill": "x", "members": 2}, {}],
    "arms[1].ensemble.members": [1, 0, -3, 10 ** 9, "2", 2.5, NAN],
    "arms[1].ensemble.distill": ["mean", 1, None],
    "arms[1].ensemble.sample_seed": [-1, 2 ** 64, "s", 1.5],
    "budget": [5, "fast", None],
    "budget.seconds": [0, -5, NAN, INF, "5", None, 10 ** 12, [5]],
    "budget.workers": [0, -1, 10 ** 7, 1.5, "2"],
    "budget.cpus_per_worker": [0, -1, 1e-9, NAN, INF, 10 ** 6, "1"],
    "budget.gpus_per_worker": [-1, NAN, INF, 1000, "0"],
    "budget.schedule": ["parallel", 1, None],
    "training": ["long", 5],
    "training.max_epochs": [0, -1, 10 ** 12, 1.5, "10"],
    "training.epochs_per_step": [0, -1, 10 ** 12, "1"],
    "training.checkpoint_every": [0, -1, 10 ** 12],
    "training.max_failures": [-1, 10 ** 6, "2"],
    "training.device": ["banana", "cuda:1000", "", 0, "cpu; rm -rf /"],
    "tracking": ["sqlite:///x.db", 3],
    "tracking.uri": [5, ["x"], "u" * 5000],
    "tracking.experiment": ["", LONG * 2, 5],
}
# keys a study does not have, at each level
UNKNOWN = ["", "dataset.", "model.", "arms[0].", "arms[1].ensemble.", "budget.", "training.", "tracking."]
REQUIRED = ["name", "dataset", "arms", "budget", "dataset.name", "budget.seconds", "arms[0].name", "arms[0].method",
            "arms[1].ensemble.members"]


def _split(path: str) -> list:
    out = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        if name:
            out.append(name)
        if rest:
            out.append(int(rest.rstrip("]")))
    return out


def _set(study: dict, path: str, value, delete: bool = False) -> dict:
    study = copy.deepcopy(study)
    *parents, leaf = _split(path)
    node = study
    for p in parents:
        node = node[p]
    if delete:
        del node[leaf]
    else:
        node[leaf] = value
    return study


def _yaml(study: dict) -> str:
    return yaml.safe_dump(study, sort_keys=False, allow_unicode=True)


def corpus() -> list[tuple[str, bytes, str]]:
    """(file name, content, text the error line must contain)."""
    cases: list[tuple[str, bytes, str]] = []
    for path, values in BAD.items():
        for k, value in enumerate(values):
            cases.append((f"bad-{path}-{k}", _yaml(_set(BASE, path, value)).encode(), path))
    for prefix in UNKNOWN:
        where = prefix + "surplus"
        study = _set(BASE, where, 1)
        cases.append((f"unknown-{where}", _yaml(study).encode(), "unknown key"))
    for path in REQUIRED:
        cases.append((f"missing-{path}", _yaml(_set(BASE, path, None, delete=True)).encode(), "required key"))
    text = _yaml(BASE)
    laughs = "".join(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else 'lol'}]\n" for i in range(9))
    cases += [
        ("yaml-duplicate-top", (text + "name: again\n").encode(), "given twice"),
        ("yaml-duplicate-nested", text.replace("  seconds: 5\n", "  seconds: 5\n  seconds: 6\n").encode(),
         "given twice"),
        ("yaml-deep", (text + "extra: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested more than"),
        ("yaml-deep-maps", (text + "extra: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n").encode(), "nested more than"),
        ("yaml-laughs", (text + laughs).encode(), "values"),
        ("yaml-many-aliases", (text + "a: &a 1\n" + "".join(f"b{i}: *a\n" for i in range(200))).encode(), "aliases"),
        ("yaml-undefined-alias", (text + "x: *nothing\n").encode(), "not valid YAML"),
        ("yaml-python-tag", (text + "x: !!python/object/apply:os.system ['echo hi']\n").encode(), "not valid YAML"),
        ("yaml-tab", text.replace("  hidden", "\thidden").encode(), "not valid YAML"),
        ("yaml-unclosed", b"name: [fuzz\n", "not valid YAML"),
        ("yaml-two-documents", (text + "---\n" + text).encode(), "not valid YAML"),
        ("yaml-list", b"- name: fuzz\n", "expected a mapping"),
        ("yaml-scalar", b"fuzz\n", "expected a mapping"),
        ("yaml-empty", b"", "expected a mapping"),
        ("yaml-null", b"~\n", "expected a mapping"),
        ("enc-latin1", "name: fuzzé\n".encode("latin-1") + text.encode(), "not UTF-8"),
        ("enc-utf16", text.encode("utf-16"), "not UTF-8"),
        ("enc-binary", bytes(range(256)) * 4, "not UTF-8"),
        ("enc-nul", text.encode() + b"\x00\n", "not valid YAML"),
        ("size-huge", text.encode() + b"# " + b"x" * (2 << 20) + b"\n", "larger than"),
        ("size-long-line", (text + "tracking2: " + "y" * 900_000 + "\n").encode(), "unknown key"),
        ("value-huge-list", _yaml(_set(BASE, "model.hidden", [16] * 50_000)).encode(), "model.hidden"),
        ("arm-name-twice", _yaml(_set(BASE, "arms[1].name", "fixed")).encode(), "arms[1].name"),
        ("seeds-times-arms", _yaml(_set(_set(BASE, "seeds", 1000), "arms",
                                        [{**BASE["arms"][0], "name": f"a{i}"} for i in range(100)])).encode(),
         "runs"),
        ("override-not-mapping", _yaml(_set(BASE, "budget", 5)).encode(), "budget"),
        ("data-mnist-without-root", _yaml(_set(BASE, "dataset", {"name": "mnist"})).encode(), "mnist"),
        ("replay-unknown", _yaml(_set(BASE, "arms[1]", {"name": "r", "method": "sgd",
                                                         "search": {"replay": "nope"}})).encode(), "replay"),
        ("concurrent-too-few-workers", _yaml(_set(BASE, "budget.schedule", "concurrent")).encode(), "budget.workers"),
    ]
    return cases


DRIVER = r"""
import json, re, sys, time
from click.testing import CliRunner
from hypersweep.orchestrator.cli import main
out = []
for path in sys.argv[1:]:
    t = time.monotonic()
    r = CliRunner().invoke(main, ["validate", path])
    out.append({"path": path, "exit": r.exit_code, "stderr": r.stderr, "stdout": r.stdout,
                "exception": None if isinstance(r.exception, SystemExit) or r.exception is None else repr(r.exception),
                "seconds": time.monotonic() - t})
# this process's own peak (ru_maxrss would carry the forking pytest process's across exec)
peak_kb = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
print(json.dumps({"cases": out, "maxrss_mb": peak_kb / 1024}))
"""


def test_every_malformed_study_is_one_line_exit_2(tmp_path):
    cases = corpus()
    assert len(cases) >= 200
    folder = tmp_path / "corpus"
    folder.mkdir()
    expect = {}
    for name, content, says in cases:
        path = folder / f"{name}.yaml"
        path.write_bytes(content)
        expect[str(path)] = says
    (folder / "a-directory.yaml").mkdir()
    expect[str(folder / "a-directory.yaml")] = "cannot read the study file"
    expect[str(folder / "missing.yaml")] = "cannot read the study file"

    r = subprocess.run([sys.executable, "-c", DRIVER, *expect], capture_output=True, text=True, cwd=tmp_path,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.splitlines()[-1])
    problems = []
    for case in report["cases"]:
        path, err = case["path"], case["stderr"]
        lines = err.splitlines()
        if case["exit"] != 2 or case["exception"] or len(lines) != 1:
            problems.append(f"{Path(path).name}: exit {case['exit']} {case['exception'] or ''} {err[:300]!r}")
            continue
        line = lines[0]
        says = expect[path]
        # the key named, or the entry that holds it (a check across its keys, e.g. search: {replay: 5})
        named = says in line or f"{says.rsplit('.', 1)[0]}: " in line
        if not line.startswith(f"hypersweep: error: {path}") or not named or "Traceback" in err:
            problems.append(f"{Path(path).name}: {line[:300]!r} (expected {expect[path]!r})")
        if len(line) > 1100:
            problems.append(f"{Path(path).name}: a line of {len(line)} characters")
        if case["seconds"] > 5:
            problems.append(f"{Path(path).name}: {case['seconds']:.1f} s")
    slowest = max(report["cases"], key=lambda c: c["seconds"])
    print(f"\n{len(report['cases'])} files, slowest {Path(slowest['path']).name} {slowest['seconds']:.2f} s, "
          f"peak memory {report['maxrss_mb']:.0f} MB")
    assert not problems, "\n".join(problems)
    assert report["maxrss_mb"] < 1024
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # nothing created


@pytest.mark.parametrize("name", ["bad-seed-0", "yaml-laughs", "bad-model.hidden-0", "data-mnist-without-root",
                                  "enc-latin1", "bad-name-1"])
def test_run_on_a_malformed_study_creates_nothing(tmp_path, name):
    content = dict((n, c) for n, c, _ in corpus())[name]
    (tmp_path / "study.yaml").write_bytes(content)
    r = subprocess.run(["hypersweep", "run", "study.yaml", "--no-live"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no studies/, no mlflow.db, no mlruns/


def test_set_into_a_value_that_is_not_a_mapping_is_one_line(tmp_path):
    (tmp_path / "study.yaml").write_text(_yaml(BASE))
    r = subprocess.run(["hypersweep", "run", "study.yaml", "--set", "name.x=1", "--no-live"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2, r.stderr
    [line] = r.stderr.splitlines()
    assert "name: is 'fuzz', not a mapping; cannot set name.x" in line


def _commands(group, path=()):
    import click
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


def test_every_command_s_help_has_an_example():
    """STYLE.md: every command has `--help` text with an example (the README says so too)."""
    from click.testing import CliRunner

    from hypersweep.orchestrator.cli import main
    commands = list(_commands(main))
    assert len(commands) >= 17 and ("cluster", "attach") in commands
    for command in commands:
        result = CliRunner().invoke(main, [*command, "--help"])
        lines = result.output.splitlines()
        assert result.exit_code == 0 and "  Example:" in lines, (command, result.output)
        assert lines[lines.index("  Example:") + 1].lstrip().startswith("hypersweep "), (command, result.output)
