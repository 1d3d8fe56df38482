"""The arms' deadlines where every trial can read them: one named Ray actor per coordinator.

A trial's config carries the deadline its arm had when the trial was created. A trial restored
by `Tuner.restore` after the coordinator died keeps that config (Tune does not rebuild the
configs of existing trials), but its arm's budget now ends elsewhere: the resumed arm is
charged the time it had used and gets the rest from the moment it resumes. So the coordinator
posts each arm's current deadline (wall-clock seconds) on this board, under the arm's key in
the trial config (`deadline_key`), and trials read it at the start of every step.
"""
from __future__ import annotations

import ray

BOARD_NAME = "hypersweep-deadlines"


@ray.remote(num_cpus=0)
class DeadlineBoard:
    def __init__(self):
        self._at: dict[str, float] = {}

    def post(self, key: str, at: float) -> None:
        self._at[key] = at

    def read(self, key: str) -> float | None:
        return self._at.get(key)


_board = None  # this process's handle on the board (one Ray job: one board)


def deadline_board():
    """The board of this Ray job, made on first use, on the coordinator's own node (a lost
    worker node must not take it along). The coordinator keeps its handle: a named actor that
    is not detached lives as long as a handle on it does."""
    global _board
    if _board is None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        _board = DeadlineBoard.options(name=BOARD_NAME, get_if_exists=True, scheduling_strategy=here).remote()
    return _board


def posted_deadline(key: str, timeout_s: float = 30.0) -> float | None:
    """The deadline posted for `key`, or None (no board: a trial outside a study, or a board
    that does not answer; the trial then keeps the deadline its config carries)."""
    global _board
    if not ray.is_initialized():
        return None
    if _board is None:
        try:
            _board = ray.get_actor(BOARD_NAME)
        except ValueError:
            return None
    try:
        return ray.get(_board.read.remote(key), timeout=timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        _board = None
        return None
