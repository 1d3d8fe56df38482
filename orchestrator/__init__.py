"""The coordinator: CLI, study files, planning, budgets, Tune launches, records in MLflow.

The only package that talks to MLflow or the user; it drives workers/ through Ray Tune.
"""
