"""Advantages, in one place, as the paper computes them (TreeGRPO, arXiv 2512.08153, Sec. 3.3;
DESIGN.md §1). The pipeline, one function per stage, each named for what it returns:

    leaf rewards (name -> (L,))
      -> `leaf_advantages`   normalised per prompt, one (L,) advantage per leaf   [the driver]
      -> `node_values`       leaf -> root value propagation over the forest, (M,) [the learner]
      -> `child_advantages`  the advantage of each decision's K children, (N, K) [the learner]

* `leaf_advantages` combines several rewards (TreeGRPO's multi-reward setting, HPSv2.1 +
  CLIPScore, Sec. 4) in one of two modes: "raw", r = sum_n w_n r_n then A = normalise(r) (clip
  once, on A); "advantage", A = sum_n w_n normalise(r_n) clamped to +-clip, each reward on its own
  per-prompt scale first, so a reward with a large numeric range (JPEG kB) does not drown a small
  one (HPS ~0.3); the sum is not re-normalised, so sum |w_n| sets its scale. A leaf with NaN/inf in
  any reward is dropped: left out of its prompt's mean/std, advantage exactly 0, counted in
  `reward/<name>/nonfinite` and `reward/dropped`; no NaN reaches the advantages.
* `normalize_per_prompt`: A = (r - mean_p) / (std_p + eps), population std over every leaf of
  prompt p (all of its trees), optionally clipped to +-clip; or (`std="batch"`/`"none"`) centred
  per prompt but scaled by one batch-wide std or not at all. `RunningPromptStats` is DDPO's
  baseline in place of GRPO's group: per-prompt statistics over a buffer that persists across
  iterations (Black et al. 2023, arXiv 2305.13301, §4.2).
* `node_values`: a leaf node keeps its normalised reward, an inner node's value is the weighted
  mean of its children's values, and the edge u -> c gets advantage V(c). Weights are "uniform"
  (the authors' released code) or "softmax" over the children of log_probs / temperature (the
  paper's "weighted by generation probability"; log_probs[c] is the old log-prob of the edge into
  c). With per-element-mean log-probs the children of one node differ by O(1/(C*H*W)), so softmax
  is nearly uniform unless the temperature is small; with sum-reduced log-probs it can be very
  peaked. It is vectorised (levels bottom-up with index_add); `node_values_recursive` is its slow,
  readable twin, and a property test holds them equal.

Conventions / departures:
* A prompt with a single leaf (or zero spread with eps = 0) gets advantage 0, not NaN.
* Statistics are computed in float64; results come back in float32.
* The flat baseline (Flow-GRPO / DanceGRPO) normalises trajectory rewards the same way; every
  trained step of a trajectory gets its advantage (a chain's only leaf).
"""
from __future__ import annotations

import math
from typing import Callable

import torch


MODES = ("raw", "advantage")


def _check(raw: dict[str, torch.Tensor], weights: dict[str, float], prompt_ids: torch.Tensor, mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if not raw:
        raise ValueError("no rewards given")
    unknown = sorted(set(raw) - set(weights))
    if unknown:
        raise ValueError(f"no weight for reward(s) {unknown}; known rewards: {sorted(weights)}")
    missing = sorted(set(weights) - set(raw))
    if missing:
        raise ValueError(f"weighted reward(s) {missing} missing from the scores; got {sorted(raw)}")
    for name, w in weights.items():
        if not math.isfinite(float(w)):
            raise ValueError(f"weight of reward '{name}' must be finite, got {w}")
    if prompt_ids.dim() != 1 or prompt_ids.numel() == 0:
        raise ValueError(f"prompt_ids must be a non-empty (L,) tensor, got shape {tuple(prompt_ids.shape)}")
    for name, r in raw.items():
        if tuple(r.shape) != tuple(prompt_ids.shape):
            raise ValueError(f"reward '{name}' has shape {tuple(r.shape)}; expected {tuple(prompt_ids.shape)} "
                             f"like prompt_ids")


def finite_mask(raw: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """(L,) bool, True where every reward is finite, and the per-reward non-finite counts."""
    names = sorted(raw)
    finite = {n: torch.isfinite(raw[n].float()) for n in names}
    mask = torch.stack([finite[n] for n in names]).all(dim=0)               # (L,)
    metrics = {f"reward/{n}/nonfinite": float((~finite[n]).sum()) for n in names}
    metrics["reward/dropped"] = float((~mask).sum())
    return mask, metrics


def _stats(prefix: str, r: torch.Tensor) -> dict[str, float]:
    if r.numel() == 0:
        return {}
    return {f"{prefix}/mean": float(r.mean()), f"{prefix}/std": float(r.std(unbiased=False)),
            f"{prefix}/min": float(r.min()), f"{prefix}/max": float(r.max())}


def leaf_advantages(raw: dict[str, torch.Tensor], weights: dict[str, float], prompt_ids: torch.Tensor,
                    mode: str = "raw", eps: float = 1e-4,
                    clip: float | None = None, std: str = "prompt",
                    normalize: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Several raw rewards per leaf -> one normalised advantage per leaf (see the module docstring).
    raw: name -> (L,) rewards; weights: name -> float (same names); prompt_ids (L,) long;
    std: how centred rewards are scaled (`normalize_per_prompt`); normalize:
    (combined finite rewards (L',), their prompt_ids) -> (L',) advantages in place of the group
    normalisation ("raw" mode only; e.g. DDPO's `RunningPromptStats`), clipped to +-clip after.
    Returns (advantages (L,) float32, metrics of python floats)."""
    _check(raw, weights, prompt_ids, mode)
    mask, metrics = finite_mask(raw)
    ids = prompt_ids[mask]                                                  # (L',)
    kept = {n: raw[n].float()[mask].double() for n in sorted(raw)}          # name -> (L',)
    for n, r in kept.items():
        metrics.update(_stats(f"reward/{n}", r))
    adv = torch.zeros(prompt_ids.shape[0], dtype=torch.float32, device=prompt_ids.device)
    if ids.numel() == 0:
        return adv, metrics
    if mode == "raw":
        combined = sum(float(weights[n]) * r for n, r in kept.items())      # (L',) float64
        metrics.update(_stats("reward/combined", combined))
        if normalize is None:
            a = normalize_per_prompt(combined, ids, eps=eps, clip=clip, std=std)
        else:
            a = normalize(combined, ids)
            a = a.clamp(-clip, clip) if clip is not None else a
    elif normalize is not None:
        raise ValueError("a custom normalize needs mode='raw' (one combined reward per leaf)")
    else:
        a = sum(float(weights[n]) * normalize_per_prompt(r, ids, eps=eps, clip=None, std=std) for n, r in kept.items())
        if clip is not None:
            if clip <= 0:
                raise ValueError(f"clip must be > 0 or None, got {clip}")
            a = a.clamp(-clip, clip)
    adv[mask] = a.float().to(adv.device)
    metrics["adv/leaf_abs_mean"] = float(adv[mask].abs().mean())
    return adv, metrics


STD_MODES = ("prompt", "batch", "none")

def normalize_per_prompt(rewards: torch.Tensor, prompt_ids: torch.Tensor, eps: float = 1e-4,
                         clip: float | None = None, std: str = "prompt") -> torch.Tensor:
    """Centre rewards per prompt and scale them; rewards, prompt_ids (L,) -> (L,) float32.

    std="prompt": (r - mean_p) / (std_p + eps), population std of the prompt's own leaves (GRPO,
        TreeGRPO, Flow-GRPO). A prompt whose leaves all score alike (std_p ~ 0) gets advantages
        of size ~1 from differences that carry no information.
    std="batch":  (r - mean_p) / (std_B + eps), std_B the population std of the centred rewards
        over the whole batch: prompts keep their relative spread, so a group with no real
        differences gets a small advantage (Dr. GRPO's objection to per-group std, Liu et al.
        2025, arXiv 2503.20783, with a batch-level scale kept so the step size is reward-agnostic).
    std="none":   r - mean_p.
    Prompts with a single leaf get advantage 0.
    """
    if rewards.dim() != 1 or prompt_ids.shape != rewards.shape:
        raise ValueError(f"rewards and prompt_ids must both be (L,), got {tuple(rewards.shape)} "
                         f"and {tuple(prompt_ids.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if clip is not None and clip <= 0:
        raise ValueError(f"clip must be > 0 or None, got {clip}")
    if std not in STD_MODES:
        raise ValueError(f"std must be one of {STD_MODES}, got {std!r}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN/inf")
    r = rewards.double()
    _, group = torch.unique(prompt_ids, return_inverse=True)             # (L,) in [0, P)
    n_groups = int(group.max()) + 1 if group.numel() else 0
    count = torch.zeros(n_groups, dtype=torch.float64, device=r.device).index_add_(0, group, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, group, r) / count        # (P,)
    centred = torch.where(count[group] > 1, r - mean[group], torch.zeros_like(r))  # (L,)
    if std == "prompt":
        var = torch.zeros_like(count).index_add_(0, group, centred ** 2) / count
        scale = var.sqrt()[group] + eps                                   # (L,)
    elif std == "batch":
        scale = (centred ** 2).mean().sqrt().expand_as(r) + eps           # (L,)
    else:
        scale = torch.ones_like(r)
    adv = torch.where(scale > 0, centred / torch.where(scale > 0, scale, 1.0), torch.zeros_like(r))
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    return adv.float()


class RunningPromptStats:
    """DDPO's per-prompt reward statistics across iterations (its reference trainer's defaults:
    buffer 16, min_count 16, eps 1e-6).

    `normalize(rewards, prompts)`: each prompt's new rewards first join its buffer (the last
    `buffer` rewards it received, over all iterations), then A = (r - mean) / (std + eps), with the
    buffer's population mean/std, or, while a prompt's buffer holds fewer than `min_count`
    rewards, the mean/std of all of this call's rewards. The state is plain floats
    (`state()` / `RunningPromptStats(..., state=...)`), so a checkpoint can carry it.
    """

    def __init__(self, buffer: int = 16, min_count: int = 16, eps: float = 1e-6,
                 state: dict[str, list[float]] | None = None):
        if buffer < 1 or min_count < 1 or eps < 0:
            raise ValueError(f"need buffer >= 1, min_count >= 1 and eps >= 0, got {buffer}, {min_count}, {eps}")
        self.buffer, self.min_count, self.eps = buffer, min_count, eps
        self.history: dict[str, list[float]] = {k: list(v)[-buffer:] for k, v in (state or {}).items()}

    def state(self) -> dict[str, list[float]]:
        return {k: list(v) for k, v in self.history.items()}

    def normalize(self, rewards: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """rewards (L,), prompts: L prompt strings -> (L,) float32 advantages."""
        if rewards.dim() != 1 or len(prompts) != rewards.shape[0]:
            raise ValueError(f"need (L,) rewards and L prompts, got {tuple(rewards.shape)} and {len(prompts)}")
        if not torch.isfinite(rewards).all():
            raise ValueError("rewards contain NaN/inf")
        r = rewards.double().cpu()
        adv = torch.empty_like(r)
        fallback = (r.mean(), r.std(unbiased=False))
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            seen = (self.history.get(prompt, []) + r[rows].tolist())[-self.buffer:]
            self.history[prompt] = seen
            if len(seen) < self.min_count:
                mean, std = fallback
            else:
                buf = torch.tensor(seen, dtype=torch.float64)
                mean, std = buf.mean(), buf.std(unbiased=False)
            adv[rows] = (r[rows] - mean) / (std + self.eps)
        return adv.float().to(rewards.device)


def _check_forest(parent: torch.Tensor, leaf_values: torch.Tensor, weighting: str, log_probs, temperature) -> None:
    m = parent.shape[0] if parent.dim() == 1 else -1
    if parent.dim() != 1 or leaf_values.shape != parent.shape:
        raise ValueError(f"parent and leaf_values must both be (M,), got {tuple(parent.shape)} "
                         f"and {tuple(leaf_values.shape)}")
    if m and (int(parent.min()) < -1 or int(parent.max()) >= m):
        raise ValueError(f"parent indices must lie in [-1, {m})")
    if weighting not in ("uniform", "softmax"):
        raise ValueError(f"weighting must be 'uniform' or 'softmax', got {weighting!r}")
    if weighting == "softmax":
        if log_probs is None or log_probs.shape != parent.shape:
            raise ValueError("weighting='softmax' needs log_probs of shape (M,)")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")


def node_depths(parent: torch.Tensor) -> torch.Tensor:
    """Depth of every node of a forest given by parent (M,) (-1 = root). Raises on a cycle."""
    m = parent.shape[0]
    has_parent = parent >= 0
    safe_parent = parent.clamp(min=0)
    depth = torch.zeros(m, dtype=torch.long, device=parent.device)
    for _ in range(m + 1):  # each pass settles at least one more level; a cycle never settles
        new = torch.where(has_parent, depth[safe_parent] + 1, torch.zeros_like(depth))
        if torch.equal(new, depth):
            return depth
        depth = new
    raise ValueError("parent array contains a cycle")


def node_values(parent: torch.Tensor, leaf_values: torch.Tensor, weighting: str = "uniform",
                    log_probs: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Value of every node of a forest (the paper's edge advantage of u -> c is values[c]).

    parent (M,) long (-1 for roots, any node order); leaf_values (M,) with the normalised reward
    at childless nodes and NaN elsewhere; log_probs (M,) old log-prob of the edge into each node
    (needed for "softmax"; roots' entries are ignored). Returns (M,) float32.
    """
    _check_forest(parent, leaf_values, weighting, log_probs, temperature)
    m = parent.shape[0]
    dev = parent.device
    child = torch.nonzero(parent >= 0).squeeze(1)                          # (E,) non-root nodes
    par = parent[child]                                                     # (E,)
    n_children = torch.zeros(m, dtype=torch.long, device=dev).index_add_(0, par, torch.ones_like(par))
    is_leaf = n_children == 0
    given = ~torch.isnan(leaf_values)
    if bool((is_leaf & ~torch.isfinite(leaf_values)).any()):
        bad = int(torch.nonzero(is_leaf & ~torch.isfinite(leaf_values))[0])
        raise ValueError(f"node {bad} has no children and no finite leaf value")
    if bool((~is_leaf & given).any()):
        bad = int(torch.nonzero(~is_leaf & given)[0])
        raise ValueError(f"node {bad} has children but also a leaf value (use NaN for inner nodes)")
    depth = node_depths(parent)

    # normalised weight of each edge parent -> child: w[c] / sum of w over c's siblings
    if weighting == "uniform":
        w = torch.ones(child.shape[0], dtype=torch.float64, device=dev)
    else:
        z = log_probs[child].double() / temperature                        # (E,)
        if not bool(torch.isfinite(z).all()):
            raise ValueError("log_probs of non-root nodes must be finite for softmax weighting")
        zmax = torch.full((m,), -math.inf, dtype=torch.float64, device=dev).scatter_reduce(
            0, par, z, reduce="amax")
        w = torch.exp(z - zmax[par])                                       # (E,) in (0, 1]
    total = torch.zeros(m, dtype=torch.float64, device=dev).index_add_(0, par, w)
    w = w / total[par]

    values = torch.where(is_leaf, leaf_values.double(), torch.zeros(m, dtype=torch.float64, device=dev))
    child_depth = depth[child]
    for j in range(int(depth.max()) if m else 0, 0, -1):  # deepest level first
        sel = child_depth == j
        c, p = child[sel], par[sel]
        values.index_add_(0, p, w[sel] * values[c])
    return values.float()


def node_values_recursive(parent: torch.Tensor, leaf_values: torch.Tensor, weighting: str = "uniform",
                              log_probs: torch.Tensor | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Slow, readable twin of `node_values` (plain python recursion over child lists)."""
    _check_forest(parent, leaf_values, weighting, log_probs, temperature)
    parents = parent.tolist()
    leaf = leaf_values.double().tolist()
    logp = log_probs.double().tolist() if log_probs is not None else None
    children: list[list[int]] = [[] for _ in parents]
    for node, p in enumerate(parents):
        if p >= 0:
            children[p].append(node)
    values: list[float | None] = [None] * len(parents)

    def value(node: int, visiting: set) -> float:
        if values[node] is not None:
            return values[node]
        if node in visiting:
            raise ValueError("parent array contains a cycle")
        kids = children[node]
        if not kids:
            if not math.isfinite(leaf[node]):
                raise ValueError(f"node {node} has no children and no finite leaf value")
            values[node] = leaf[node]
            return values[node]
        if not math.isnan(leaf[node]):
            raise ValueError(f"node {node} has children but also a leaf value (use NaN for inner nodes)")
        if weighting == "uniform":
            weights = [1.0 / len(kids)] * len(kids)
        else:
            scores = [logp[c] / temperature for c in kids]
            top = max(scores)
            exps = [math.exp(s - top) for s in scores]
            weights = [e / sum(exps) for e in exps]
        visiting.add(node)
        values[node] = sum(w * value(c, visiting) for w, c in zip(weights, kids))
        visiting.discard(node)
        return values[node]

    for node in range(len(parents)):
        value(node, set())
    return torch.tensor(values, dtype=torch.float32, device=parent.device)


def child_advantages(forest, leaf_advantages: torch.Tensor, *, weighting: str = "uniform",
                     temperature: float = 1.0, baseline: str = "none") -> torch.Tensor:
    """Per-child advantages (N, K) of a batch's decisions from its per-leaf advantages (L,):
    propagate leaf -> root (`node_values`), then read the value of each decision's children.
    forest: anything with the TreeBatch fields parent (M,), child_node (N, K), leaf_node (L,) and
    node_log_prob (M,) (used by "softmax"). Leaves whose reward was dropped (NaN) get the neutral
    value 0 (they push neither way); their siblings still train.

    baseline="none":   A(u -> c) = V(c), the paper's edge advantage.
    baseline="parent": A(u -> c) = V(c) - V(u), each child against its siblings. V(u) was settled
        by the decisions above u, so in V(c) it is noise for u's own choice; subtracting it keeps
        the expected gradient (up to the factor (K-1)/K of a group mean that includes the child,
        as in GRPO) and removes that noise. Only for decisions with K >= 2 children (trees).
    """
    m = forest.parent.shape[0]
    leaf_values = torch.full((m,), float("nan"))
    leaf_values[forest.leaf_node] = leaf_advantages.float().cpu()
    dropped = ~torch.isfinite(leaf_values[forest.leaf_node])
    if dropped.any():
        leaf_values[forest.leaf_node[dropped]] = 0.0  # neutral value: no push either way
    values = node_values(forest.parent, leaf_values, weighting=weighting,
                         log_probs=forest.node_log_prob if weighting == "softmax" else None, temperature=temperature)
    adv = values[forest.child_node]  # (N, K)
    if baseline == "parent":
        if forest.child_node.shape[1] < 2:
            raise ValueError("baseline='parent' needs decisions with K >= 2 children; a chain (flat/mix) "
                             "would get advantage 0 everywhere")
        adv = adv - values[forest.parent[forest.child_node[:, 0]]][:, None]
    elif baseline != "none":
        raise ValueError(f"baseline must be 'none' or 'parent', got {baseline!r}")
    return adv


def combined_reward(raw: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    """The weighted mean of a leaf's rewards, (L,) float32 (non-finite where any reward is): what
    the run reports as `reward/combined` and `eval/reward` (`leaf_advantages` normalises the
    weighted sum, which differs from it by the constant sum of the weights)."""
    return sum(weights[n] * raw[n].float() for n in weights) / sum(weights.values())
