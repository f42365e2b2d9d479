"""Every random choice of a run is a function of (seed, iteration), so a resumed run replays
exactly the iterations the uninterrupted one would have; these are those functions."""
from __future__ import annotations


def iteration_seed(seed: int, iteration: int) -> int:
    """Prompt choice and window of an iteration (driver), minibatch order (learner)."""
    return seed * 1_000_003 + iteration


def sampler_seed(seed: int, iteration: int, call: int) -> int:
    """Noise of sampler call `call` of an iteration."""
    return seed * 1_000_003 + iteration * 1_009 + call
