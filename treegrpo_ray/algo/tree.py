"""Tree shape, SDE window and compute accounting for TreeGRPO (arXiv 2512.08153, Sec. 3).

Implements, in the notation of DESIGN.md §1 (T steps, branching factor k, window depth d,
window start p):

* the window W = [p, p + d): the only stochastic (SDE) steps; every other step is an ODE step;
* the tree: one shared root at step p, every node inside the window draws k children, so the
  tree has k**d leaves and (k**d - 1)/(k - 1) branching nodes ("decisions");
* the transformer-call count  p + (k**d - 1)/(k - 1) + k**d * (T - p - d)  (prefix shared by
  all leaves, one call per decision, then an independent ODE tail per leaf), against G*T for G
  independent trajectories (Flow-GRPO / DanceGRPO);
* window placement: "random" (uniform start each iteration, the paper's description) or
  "sliding" (the authors' released code, and MixGRPO's progressive schedule: start at 0 and move
  `stride` steps forward every `shift_every` iterations, back to 0 after the last allowed start);
* the flat baselines' trained steps (`flat_train_count`, `flat_trained_steps`), as each peer's
  trainer draws them: DanceGRPO, Flow-GRPO, or one subset per batch.

Departures: the paper gives no wrap-around rule for the sliding window; we go back to 0 as
MixGRPO's `roll_back` does, so a long run keeps cycling through the window positions. MixGRPO
shrinks the window near the end of the schedule; ours keeps d steps and stops at max_start.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _check_tree_args(num_steps: int, k: int, depth: int, window_start: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if k < 2:
        raise ValueError(f"branching factor k must be >= 2 (k=1 grows no tree), got {k}")
    if depth < 1:
        raise ValueError(f"window depth must be >= 1, got {depth}")
    if window_start < 0:
        raise ValueError(f"window_start must be >= 0, got {window_start}")
    if window_start + depth > num_steps:
        raise ValueError(f"window [{window_start}, {window_start + depth}) runs past the last step "
                         f"{num_steps - 1}; window_start must be <= num_steps - depth = {num_steps - depth}")


@dataclass(frozen=True, eq=False)
class TreeShape:
    """The index structure of one tree, nodes in breadth-first order.

    Level j (0 <= j <= tree_depth) holds k**j nodes in the contiguous slice `level(j)`; the
    children of a node are contiguous and in order. A node at level j holds the latent that is
    the *input* of step window_start + j (its `step`); levels 0..d-1 are decisions (one SDE
    step each, k children), level d holds the window's last states, from which each leaf's
    deterministic ODE tail starts.
    """

    num_steps: int        # T
    k: int                # branching factor
    tree_depth: int       # d, the window length (named so to keep `depth` for the node array)
    window_start: int     # p
    parent: torch.Tensor  # (M,) long, parent node index, -1 for the root
    depth: torch.Tensor   # (M,) long, level of each node (0 = root)
    step: torch.Tensor    # (M,) long, step index whose input the node's state is: window_start + depth

    @property
    def num_nodes(self) -> int:
        return self.parent.shape[0]

    @property
    def num_leaves(self) -> int:
        return self.k ** self.tree_depth

    @property
    def num_decisions(self) -> int:
        return (self.k ** self.tree_depth - 1) // (self.k - 1)

    @property
    def window(self) -> range:
        """Step indices of the SDE window."""
        return range(self.window_start, self.window_start + self.tree_depth)

    def level(self, j: int) -> slice:
        """Slice of the nodes at level j (0 = root, tree_depth = deepest)."""
        if not 0 <= j <= self.tree_depth:
            raise ValueError(f"level must be in [0, {self.tree_depth}], got {j}")
        start = (self.k ** j - 1) // (self.k - 1)
        return slice(start, start + self.k ** j)

    def decisions(self) -> slice:
        """Slice of the branching nodes (levels 0..d-1)."""
        return slice(0, self.num_decisions)

    def leaves(self) -> slice:
        """Slice of the deepest nodes (level d), one per leaf."""
        return self.level(self.tree_depth)

    def children(self, node: int) -> slice:
        """Slice of the k children of a decision node (breadth-first order makes them contiguous)."""
        if not 0 <= node < self.num_decisions:
            raise ValueError(f"node {node} is not a decision node (valid: 0..{self.num_decisions - 1})")
        start = node * self.k + 1
        return slice(start, start + self.k)


def build_tree(num_steps: int, k: int, depth: int, window_start: int) -> TreeShape:
    """Breadth-first node arrays of a k-ary tree of depth `depth` rooted at step `window_start`."""
    _check_tree_args(num_steps, k, depth, window_start)
    parents, depths = [torch.full((1,), -1, dtype=torch.long)], [torch.zeros(1, dtype=torch.long)]
    offset = 0  # index of the first node of the previous level
    for j in range(1, depth + 1):
        n_prev = k ** (j - 1)
        prev = torch.arange(offset, offset + n_prev, dtype=torch.long)  # (k**(j-1),)
        parents.append(prev.repeat_interleave(k))                       # (k**j,)
        depths.append(torch.full((k ** j,), j, dtype=torch.long))
        offset += n_prev
    parent, node_depth = torch.cat(parents), torch.cat(depths)  # (M,), (M,)
    return TreeShape(num_steps=num_steps, k=k, tree_depth=depth, window_start=window_start,
                     parent=parent, depth=node_depth, step=node_depth + window_start)


def choose_window(num_steps: int, depth: int, mode: str, *, generator: torch.Generator | None = None,
                  iteration: int = 0, shift_every: int = 1, max_start: int | None = None, stride: int = 1) -> int:
    """Start p of this iteration's SDE window, in [0, max_start] (default max_start = T - d).

    "random": uniform over [0, max_start], drawn from `generator` (required: no hidden global RNG).
    "sliding": stride * ((iteration // shift_every) % (max_start // stride + 1)), i.e. the window
    starts at step 0 and moves `stride` steps forward every `shift_every` iterations, back to 0
    once the next start would pass max_start (MixGRPO: floor(i / tau) * s with roll_back).
    """
    if depth < 1 or depth > num_steps:
        raise ValueError(f"window depth must be in [1, num_steps={num_steps}], got {depth}")
    if max_start is None:
        max_start = num_steps - depth
    if not 0 <= max_start <= num_steps - depth:
        raise ValueError(f"max_start must be in [0, num_steps - depth = {num_steps - depth}], got {max_start}")
    if mode == "random":
        if generator is None:
            raise ValueError("choose_window(mode='random') needs an explicit torch.Generator")
        return int(torch.randint(0, max_start + 1, (1,), generator=generator).item())
    if mode == "sliding":
        if shift_every < 1 or stride < 1:
            raise ValueError(f"shift_every and stride must be >= 1, got {shift_every} and {stride}")
        if iteration < 0:
            raise ValueError(f"iteration must be >= 0, got {iteration}")
        return stride * ((iteration // shift_every) % (max_start // stride + 1))
    raise ValueError(f"unknown window mode {mode!r}; use 'random' or 'sliding'")


def count_nfe(num_steps: int, k: int, depth: int, window_start: int) -> int:
    """Transformer calls (a CFG pair counts as one) to grow one tree and finish its leaves:
    p (shared prefix) + (k**d - 1)/(k - 1) (one per decision) + k**d * (T - p - d) (ODE tails)."""
    _check_tree_args(num_steps, k, depth, window_start)
    p, d, t = window_start, depth, num_steps
    return p + (k ** d - 1) // (k - 1) + k ** d * (t - p - d)


def count_nfe_flat(num_steps: int, group_size: int) -> int:
    """Transformer calls for `group_size` independent trajectories of `num_steps` steps: G * T."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return group_size * num_steps


FLAT_STEPS = ("dancegrpo", "flow_grpo", "batch")


def flat_train_count(num_steps: int, train_fraction: float, style: str) -> int:
    """Steps a flat trajectory trains, counted as each peer's trainer counts them:

    "dancegrpo": int((T - 1) * f): DanceGRPO drops the last step before drawing;
    "flow_grpo": int(T * f) leading steps (its SD3 presets' f = 0.99 leaves the last step out);
    "batch":     max(1, round(T * f)) of all T steps (this project's first flat baseline).
    """
    if style not in FLAT_STEPS:
        raise ValueError(f"flat steps style must be one of {FLAT_STEPS}, got {style!r}")
    if num_steps < 1 or not 0 < train_fraction <= 1:
        raise ValueError(f"need num_steps >= 1 and train_fraction in (0, 1], got {num_steps}, {train_fraction}")
    if style == "dancegrpo":
        return int((num_steps - 1) * train_fraction)
    if style == "flow_grpo":
        return int(num_steps * train_fraction)
    return max(1, round(train_fraction * num_steps))


def flat_trained_steps(num_steps: int, train_fraction: float, style: str, rows: int,
                       generator: torch.Generator) -> torch.Tensor:
    """(rows, n) step indices each flat trajectory trains, ascending in each row.

    "dancegrpo": a random permutation of steps 0 .. T-2 per trajectory, its first n (DanceGRPO's
        trainer draws one `randperm` per sample);
    "flow_grpo": steps 0 .. n-1 for every trajectory (Flow-GRPO's `range(num_train_timesteps)`);
    "batch":     one random subset of all T steps shared by the batch.
    """
    n = flat_train_count(num_steps, train_fraction, style)
    if n < 1:
        raise ValueError(f"{style}: train_fraction {train_fraction} of {num_steps} steps trains no step")
    if style == "dancegrpo":
        perms = [torch.randperm(num_steps - 1, generator=generator)[:n] for _ in range(rows)]
        return torch.stack(perms).sort(dim=1).values
    if style == "flow_grpo":
        return torch.arange(n).expand(rows, n).clone()
    return torch.randperm(num_steps, generator=generator)[:n].sort().values.expand(rows, n).clone()
