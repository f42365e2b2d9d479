"""What the driver's `LearnerGroup` and the Ray Train workers' `train_loop` say to each other.

Every command goes to every rank (DDP ranks must take the same steps) inside an `Envelope` that
names the weights version and newest checkpoint the group must be at to run it (a restarted
group catches up from there). Rank 0 answers each with the matching reply; `Ready` comes once per
start of the group, `Failed` ends the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Update:
    """One GRPO update on the merge of these batches (the samplers' ObjectRefs, in merge order; in
    a list so Ray does not resolve them in transit: each worker fetches them from the object store)."""
    batch: list
    leaf_adv: torch.Tensor
    iteration: int


@dataclass(frozen=True)
class Save:
    root: str
    iteration: int
    run_state: dict
    keep: int


@dataclass(frozen=True)
class Export:
    dir: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Envelope:
    seq: int
    version: int                # weights version the group must be at to run the command
    checkpoint: str | None      # the run's newest checkpoint, to catch up from after a restart
    command: Update | Save | Export
    # after a restart: the updates since that checkpoint, as (version before, Update), to re-apply
    replay: tuple = ()


@dataclass(frozen=True)
class Ready:
    version: int
    pid: int
    host: str
    sees_outputs: bool = True
    node: str = ""              # Ray node id of rank 0


@dataclass(frozen=True)
class Updated:
    seq: int
    version: int
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Saved:
    seq: int
    path: str


@dataclass(frozen=True)
class Exported:
    seq: int
    path: str


@dataclass(frozen=True)
class Failed:
    seq: int
    error: str


REPLY = {Update: Updated, Save: Saved, Export: Exported}
