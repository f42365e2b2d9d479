"""Stand-in sampler, reward and learner actors that *sleep* for a simulated GPU cost instead of
computing, so dozens fit on a 2-core machine and the scheduling code (`actors.dispatch.
collect_iteration`) can be measured at scale. The interfaces are those of `SamplerActor.sample`
and `RewardActor.score`: the driver cannot tell them apart.

Simulated costs (seconds of an H100 running SD3.5-medium at 512x512, CFG 4.5; assumptions, not
measurements; every figure is a `SimCosts` field so a user can put in their own):

* `nfe_s` = 0.08 s per transformer call per tree node, CFG pair included. SD3.5-medium has 2.5 B
  parameters (Stability AI model card); at 512x512 a forward sees 1024 image + 333 text tokens,
  ~2 x 2.5e9 x 1357 = 6.8 TFLOP, 13.6 TFLOP with CFG: ~0.03 s at 400 TFLOP/s bf16, ~0.07 s at a
  more typical 40 % of peak. 0.08 s sits at the slow end, which is the pessimistic end for a
  test of the reward pool and the driver (faster samplers would make them look worse).
* `decode_s` = 0.01 s per image (SD3 VAE decoder at 512x512, ~1-2 TFLOP).
* `score_s` = 0.02 s per image (HPSv2.1 is an OpenCLIP ViT-H-14 at 224x224: ~0.3 TFLOP of
  compute, plus resize/normalise; 0.02 s leaves room for that overhead).
* `learn_factor` = 3: one forward + backward per decision costs ~3 forwards (a backward ~2x).
* Sanity anchor: per tree (k=3, d=3, T=10, window start 3) this is 124 NFE x 0.08 = 9.9 s sampling,
  27 x 0.03 = 0.8 s rewards, 13 x 3 x 0.08 = 3.1 s learning, 13.8 s in all on one GPU; the paper's
  72 s per iteration (single-GPU-normalised wall clock, arXiv 2512.08153 Fig. 1) is then ~5 trees
  per iteration. The paper does not state its batch in the figure, so this only checks the order
  of magnitude.

`scale` multiplies every sleep (the benchmark runs 5x faster than real time with scale 0.2
and reports real units by dividing measured wall times by `scale`; Ray's own overheads are not
scaled, so they look `1/scale` times bigger than they are: the simulation is pessimistic).

Memory: a Ray worker that imports torch holds ~320 MB more (measured here: RssAnon 60 -> 324 MB),
so 50 stand-ins would need 16 GB. The stand-ins therefore never import torch: they ship numpy
arrays wrapped so that the *receiving* process (the driver) rebuilds the TreeBatch and the reward
tensors on unpickling (`_OnArrival`). The driver sees exactly what the real actors send it;
reward actors get the leaf chunks as (L, 1) numpy arrays instead of tensors (the only departure).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import ray

SEED_STRIDE = 10_000  # fake leaf content = seed * SEED_STRIDE + leaf index (exact in float64)


@dataclass(frozen=True)
class SimCosts:
    nfe_s: float = 0.08        # seconds per transformer call (CFG pair) of one tree node
    decode_s: float = 0.01     # seconds per image, VAE decode
    score_s: float = 0.02      # seconds per image, reward model
    learn_factor: float = 3.0  # learner forward+backward per decision, in forwards
    scale: float = 1.0         # every sleep is multiplied by this (time compression)

    def sample_s(self, nfe: int) -> float:
        return nfe * self.nfe_s * self.scale

    def reward_s(self, images: int) -> float:
        return images * (self.decode_s + self.score_s) * self.scale

    def learn_s(self, decisions: int, workers: int) -> float:
        return decisions * self.learn_factor * self.nfe_s * self.scale / workers


def nfe_by_window(num_steps: int = 10, k: int = 3, depth: int = 3) -> list[int]:
    """count_nfe for every window start 0..T-d (computed in the driver: algo/ imports torch)."""
    from treegrpo_ray.algo.tree import count_nfe

    return [count_nfe(num_steps, k, depth, p) for p in range(num_steps - depth + 1)]


def fake_tree_batch(prompts: list[str], *, num_steps: int, k: int, depth: int, window_start: int,
                    trees_per_prompt: int):
    """A valid TreeBatch with (.., 1, 1, 1) latents for `trees_per_prompt` trees per prompt and its
    leaf latents already split off (an (L, 0) placeholder, as `split_leaves` leaves it)."""
    import torch

    from treegrpo_ray.algo.tree import build_tree, count_nfe
    from treegrpo_ray.types import TreeBatch

    shape = build_tree(num_steps, k, depth, window_start)
    n_trees = len(prompts) * trees_per_prompt
    m, n, l = shape.num_nodes, shape.num_decisions, shape.num_leaves
    tree = torch.arange(n_trees)                                              # (G,)
    node_off = (tree * m).view(-1, 1)                                         # (G, 1)
    parent = torch.where(shape.parent >= 0, shape.parent + node_off, -1)      # (G, M)
    children = torch.arange(1, n * k + 1).view(1, n, k) + node_off.view(-1, 1, 1)  # (G, N, K) BFS order
    leaf_node = torch.arange(shape.leaves().start, shape.leaves().stop) + node_off  # (G, L)
    prompt_of_tree = tree // trees_per_prompt                                 # (G,)
    return TreeBatch(
        prompts=list(prompts), sigmas=torch.linspace(1.0, 0.0, num_steps + 1),
        latents=torch.zeros(n_trees * n, 1, 1, 1), step_index=shape.step[:n].repeat(n_trees),
        children=torch.zeros(n_trees * n, k, 1, 1, 1), old_log_probs=torch.zeros(n_trees * n, k),
        child_node=children.reshape(-1, k), decision_prompt=prompt_of_tree.repeat_interleave(n),
        parent=parent.reshape(-1), node_log_prob=torch.zeros(n_trees * m),
        leaf_latents=torch.empty(n_trees * l, 0), leaf_node=leaf_node.reshape(-1),
        leaf_prompt=prompt_of_tree.repeat_interleave(l), tree_index=tree.repeat_interleave(l),
        nfe=count_nfe(num_steps, k, depth, window_start) * n_trees, variant="tree")


def fake_leaves(n_leaves: int, seed: int) -> np.ndarray:
    """(L, 1) float64, leaf l holding seed * SEED_STRIDE + l, so rewards can be traced back."""
    return (seed * SEED_STRIDE + np.arange(n_leaves, dtype=np.float64)).reshape(-1, 1)


def _rebuild(kind: str, payload):
    """Runs where an `_OnArrival` is unpickled (the driver, the learner): build the torch object there."""
    import torch

    if kind == "score":
        from treegrpo_ray.system import ScoreReply

        rewards, busy = payload
        return ScoreReply({k: torch.tensor(v) for k, v in rewards.items()}, busy, {"score": busy})
    kwargs, version, sample_s = payload
    batch = fake_tree_batch(**kwargs)
    batch.policy_version = version
    if kind == "batch":
        return batch
    from treegrpo_ray.types import CallReport

    info = batch.info()
    info.call = CallReport(sample_s, restarted=False, weights_verified=False)
    return info


class _OnArrival:
    """Pickles as (kind, numpy payload); the receiver gets a torch tensor or a TreeBatch."""

    def __init__(self, kind: str, payload):
        self.kind, self.payload = kind, payload

    def __reduce__(self):
        return _rebuild, (self.kind, self.payload)


class SimSampler:
    """Sleeps count_nfe x nfe_s per tree; pulls weights from a WeightStore like SamplerActor."""

    def __init__(self, costs: SimCosts, num_chunks: int, nfe_by_window: list[int], *, store=None,
                 num_steps: int = 10, k: int = 3, depth: int = 3, trees_per_prompt: int = 1):
        self.costs, self.num_chunks, self.nfe, self.store, self.version = costs, num_chunks, nfe_by_window, store, -1
        self.tree = dict(num_steps=num_steps, k=k, depth=depth, trees_per_prompt=trees_per_prompt)
        self.leaves_per_prompt = k ** depth * trees_per_prompt

    def _load(self, weights) -> None:
        """weights = (version, [bucket refs], fingerprint) as WeightStore.latest gives them, or None."""
        if weights is not None and weights[0] > self.version:
            version, refs, _ = weights
            ray.get(refs)
            self.version = version

    def sample(self, prompts: list[str], window_start: int, seed: int, weights=None):
        """-> (info, batch without leaves, leaf chunk 0, ..., leaf chunk n-1), as SamplerActor.sample.
        weights: what the driver's launch passed along; None: ask the store (if any)."""
        t0 = time.perf_counter()
        if weights is None and self.store is not None:
            weights = ray.get(self.store.latest.remote(self.version))
        self._load(weights)
        time.sleep(self.costs.sample_s(self.nfe[window_start] * len(prompts) * self.tree["trees_per_prompt"]))
        leaves = fake_leaves(self.leaves_per_prompt * len(prompts), seed)
        payload = (dict(prompts=list(prompts), window_start=window_start, **self.tree), self.version,
                   time.perf_counter() - t0)
        return (_OnArrival("info", payload), _OnArrival("batch", payload), *np.array_split(leaves, self.num_chunks))

    def ready(self) -> int:
        return self.version


class SimReward:
    """Sleeps (decode_s + score_s) per image. Rewards are functions of what it was sent, so a
    test can check routing: "leaf" = 2 x leaf + 1, "prompt_len" = len(prompt), "actor" = its id."""

    def __init__(self, costs: SimCosts, actor_id: int = 0, fail_on: str = ""):
        self.costs, self.actor_id, self.fail_on = costs, actor_id, fail_on

    def score(self, latents: np.ndarray, prompts: list[str], num_images: int = 0):
        t0 = time.perf_counter()
        if latents.shape[0] != len(prompts):
            raise ValueError(f"{latents.shape[0]} leaves but {len(prompts)} prompts")
        if self.fail_on and self.fail_on in prompts:  # a scorer that cannot score this prompt (tests)
            raise ValueError(f"cannot score {self.fail_on!r}")
        time.sleep(self.costs.reward_s(len(prompts)))
        rewards = {"leaf": 2.0 * latents[:, 0] + 1.0,
                   "prompt_len": np.array([float(len(p)) for p in prompts]),
                   "actor": np.full(len(prompts), float(self.actor_id))}
        busy = time.perf_counter() - t0
        return _OnArrival("score", (rewards, busy))  # a ScoreReply where it arrives

    def ready(self) -> bool:
        return True


class SimLearner:
    """Stands in for a data-parallel learner of `workers` GPUs: fetches the batches from the
    object store (as a learner worker does), then sleeps decisions x learn_factor x nfe_s / workers
    (gradient all-reduce is not simulated). Returns its busy seconds."""

    def __init__(self, costs: SimCosts):
        self.costs = costs

    def update(self, decisions: int, workers: int, batch_refs: list = ()) -> float:
        t0 = time.perf_counter()
        ray.get(list(batch_refs))
        time.sleep(max(0.0, self.costs.learn_s(decisions, workers) - (time.perf_counter() - t0)))
        return time.perf_counter() - t0
