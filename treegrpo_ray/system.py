"""What the driver needs from a system (in-process or Ray): the `System` protocol that
`LocalSystem` and `RaySystem` implement (tests/test_system.py checks both against it), and the
small types it passes."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

from treegrpo_ray.types import BatchInfo, TreeBatch


EVAL_GRID_IMAGES = 16  # eval images a system decodes for the sample grid


@dataclass(frozen=True)
class SampleRequest:
    """One sampler call: grow trees for these prompts with this window and noise seed."""
    prompts: list[str]
    window_start: int
    seed: int


@dataclass
class ScoreReply:
    """A reward actor's answer to one chunk of leaves."""
    rewards: dict[str, torch.Tensor]   # scorer -> (B,) float32, NaN kept visible
    busy_s: float                      # decoding and scoring
    seconds: dict[str, float]          # of busy_s: "decode" and each scorer
    restarted: bool = False            # the actor was restarted (Ray) since its previous call
    images: torch.Tensor | None = None  # the first `num_images` decoded images (n, 3, H, W), if asked for

    @property
    def payload_bytes(self) -> int:
        """Bytes of its tensors: what fetching it moves, less pickle's framing."""
        return sum(r.nbytes for r in self.rewards.values()) + (self.images.nbytes if self.images is not None else 0)


@dataclass
class Collected:
    """An iteration's sampler output, in request order: each batch (a TreeBatch in-process, an
    ObjectRef to one on Ray: the driver never holds latents), its BatchInfo and its raw rewards
    per scorer. A call whose trees could not all be sampled and scored is left out, and counted."""
    batches: list[Any] = field(default_factory=list)
    infos: list[BatchInfo] = field(default_factory=list)
    rewards: list[dict[str, torch.Tensor]] = field(default_factory=list)
    sample_s: float = 0.0   # summed busy seconds of sampler calls
    reward_s: float = 0.0   # summed busy seconds of reward calls
    wall_s: float = 0.0     # launch -> all results in hand
    restarts: int = 0       # actor restarts observed while collecting
    reward_parts: dict[str, float] = field(default_factory=dict)  # of reward_s: decode and each scorer
    dropped_trees: int = 0  # trees of calls that failed (after Ray's retries): never trained on
    retried_calls: int = 0  # calls (or reward chunks) run again after their actor or node was lost (Ray)
    driver_bytes: int = 0   # tensor and prompt bytes the driver fetched (Ray; 0 in-process)
    dead_rewards: list[int] = field(default_factory=list)  # reward actors that died for good (Ray)

    def add(self, batch: Any, info: BatchInfo, rewards: dict[str, torch.Tensor], sample_s: float, reward_s: float,
            reward_parts: list[dict[str, float]] = ()) -> None:
        self.batches.append(batch)
        self.infos.append(info)
        self.rewards.append(rewards)
        self.sample_s += sample_s
        self.reward_s += reward_s
        for parts in reward_parts:
            for name, seconds in parts.items():
                self.reward_parts[name] = self.reward_parts.get(name, 0.0) + seconds


def split_leaves(batch: TreeBatch) -> tuple[TreeBatch, torch.Tensor]:
    """Take the leaf latents out of a batch (they go to the reward pool; the learner never needs
    them), leaving an (L, 0) placeholder so shapes still validate."""
    leaves = batch.leaf_latents
    return replace(batch, leaf_latents=leaves.new_empty((leaves.shape[0], 0))), leaves


def concat_rewards(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-scorer concatenation in batch order (the order merge_batches puts leaves in)."""
    names = list(parts[0])
    for p in parts:
        if list(p) != names:
            raise ValueError(f"reward batches disagree on scorer names: {list(p)} vs {names}")
    return {n: torch.cat([p[n].float().reshape(-1) for p in parts]) for n in names}


@runtime_checkable
class System(Protocol):
    """One iteration's stages as the driver calls them. Locations (checkpoint roots, export
    dirs) are absolute paths or URIs (treegrpo_ray.storage)."""

    @property
    def version(self) -> int:
        """Weights version the learner is at (the number of updates applied)."""

    def launch(self, requests: list[SampleRequest]) -> Any:
        """Start sampling and scoring these requests; returns an opaque handle for `collect`."""

    def collect(self, handle: Any) -> Collected:
        """Wait for a launched iteration; batches and raw rewards in request order."""

    def update(self, batches: list[Any], leaf_advantages: torch.Tensor, iteration: int) -> dict[str, float]:
        """One GRPO update on the decisions of `batches` (entries of Collected.batches, merged in
        this order: `merge_infos` of their infos is the driver's view); publishes the new weights."""

    def evaluate(self, prompts: list[str], seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """ODE samples of the current weights: per-scorer rewards (B,) and the first EVAL_GRID_IMAGES images."""

    def save(self, root: str, iteration: int, run_state: dict, keep: int) -> Any:
        """Checkpoint to root/iter_<iteration> atomically, prune to `keep`; returns its location."""

    def export(self, out_dir: str) -> str:
        """Write the trained result for plain diffusers; returns its location."""

    def close(self) -> None:
        """Release processes and actors (the system is unusable afterwards)."""
