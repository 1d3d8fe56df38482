"""Benchmarks: `python -m bench.run [hypernet_step|orchestration|scale|time_to_target|all]`.
Each compares against a reference measured in the same run and writes bench/results/<name>.json
and <name>.md."""
