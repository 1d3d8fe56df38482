"""Seeds: one master seed per study; every other seed is a named child of its parent.

    master seed  -REPETITION k->  repetition seed (shared by every arm: arms are paired)
    repetition   -SPLIT->         the data set's train/val/test split
                 -SEARCH arm->    the arm's searcher
                 -ENSEMBLE->      the generator of ensemble members drawn after the budget
                 = method seed of the arm's trials; replica r > 0 of a fixed arm: -REPLICA r->
    method seed  -INIT->          initial weights (target net, hypernet, STN)
                 -ORDER->         minibatch order, validation minibatches
                 -NOISE->         dropout masks, input noise, perturbations, augmentation, the
                                  weight samples of a training step
                 -EVAL->          the fixed weight samples a generative method is evaluated on

A child is `SeedSequence(parent, spawn_key=(crc32(stream name), *keys))`, what
`SeedSequence(parent).spawn` makes with the stream's name in place of a position, so adding a
stream moves no other seed. crc32, not `hash()`: Python salts string hashes per process.
"""
from __future__ import annotations

import enum
import zlib

import numpy as np


class Stream(enum.Enum):
    REPETITION = "repetition"
    SPLIT = "split"
    SEARCH = "search"
    ENSEMBLE = "ensemble"
    REPLICA = "replica"
    INIT = "init"
    ORDER = "order"
    NOISE = "noise"
    EVAL = "eval"


def stable_key(name: str) -> int:
    """A name as a SeedSequence key, the same in every process."""
    return zlib.crc32(name.encode())


def child_seed(parent: int, stream: Stream, *keys: int | str) -> int:
    """The seed of `stream` under `parent`; `keys` (an index, an arm name) tell apart children
    of one stream."""
    spawn_key = (stable_key(stream.value), *(stable_key(k) if isinstance(k, str) else int(k) for k in keys))
    return int(np.random.SeedSequence(parent, spawn_key=spawn_key).generate_state(1)[0])


def repetition_seeds(master: int, n: int) -> list[int]:
    """One seed per repetition (every arm of a repetition gets it, so arms are paired)."""
    return [child_seed(master, Stream.REPETITION, k) for k in range(n)]


def stream_generator(seed: int, stream: Stream, device="cpu"):
    """A torch.Generator on `device` seeded with `stream`'s child of `seed`."""
    import torch  # here: the orchestrator plans seeds without loading torch
    return torch.Generator(device=device).manual_seed(child_seed(seed, stream))
