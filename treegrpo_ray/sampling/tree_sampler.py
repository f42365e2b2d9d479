"""Grow TreeGRPO trees (and the flat / mix baselines) with a policy; return a `TreeBatch`.

Implements the sampling side of TreeGRPO (arXiv 2512.08153, Sec. 3; DESIGN.md §1):

* `tree`: one shared initial noise per tree; ODE (Euler) steps before the window
  [p, p + d); at each window level every node of that level -- across all trees and prompts --
  goes through ONE batched denoiser call, and each node draws k children from the same
  Gaussian (the policy's `sde_step(n_children=k)`: flow SDE, or DDIM for SD1.5); then the ODE tail runs for all k**d deepest nodes.
  Transformer calls per tree: p + (k**d - 1)/(k - 1) + k**d (T - p - d) = `algo.tree.count_nfe`.
* `flat` (DanceGRPO / Flow-GRPO): `group_size` independent trajectories per group, SDE on every
  step, decisions (K = 1) recorded on the steps `flat_steps` picks (`algo.tree.flat_trained_steps`):
  DanceGRPO's own random subset of steps 0..T-2 per trajectory, Flow-GRPO's leading steps, or
  one random subset for the whole batch. `share_initial_noise` gives the trajectories of a group
  one x_T (DanceGRPO's `--init_same_noise`).
* `mix` (MixGRPO, arXiv 2507.21802): SDE only inside the window [p, p + d), ODE elsewhere,
  independent trajectories, decisions on the d window steps.

Node layout (see `treegrpo_ray.types`): tree r owns nodes [r*M_t, (r+1)*M_t) in the breadth-first
order of `algo.tree.build_tree`, and its decisions are rows [r*D, (r+1)*D) (the first D nodes
of the tree). A flat/mix trajectory is a chain of n+1 nodes: node j is the state after the j-th
trained step (node 0 the state the first trained step starts from), so every edge of a
trajectory inherits that trajectory's leaf value. `tree_index` numbers trees (tree) or groups of
`group_size` trajectories (flat/mix), `trees_per_prompt` of them per prompt.

All randomness comes from one CPU `torch.Generator` seeded with `seed` (initial noise, children,
the flat variant's trained steps), so a seed gives the same batch on CPU and GPU up to kernel
numerics. Latent states are kept in float32; the transformer runs in the policy's dtype.
Sampling runs under `torch.no_grad()` (not inference_mode: the learner feeds stored latents back
into autograd). The batch is returned on CPU, ready for `ray.put`.
"""
from __future__ import annotations

import torch

from treegrpo_ray.algo.tree import FLAT_STEPS, build_tree, count_nfe, flat_trained_steps
from treegrpo_ray.types import TreeBatch

VARIANTS = ("tree", "flat", "mix")


class TreeSampler:
    """One sampler, three shapes (`variant`). See the module docstring for each.

    num_steps T, k (tree branching), depth d (window length), noise_level eta; group_size:
    trajectories per group for flat/mix (>= 2; config's tree.leaves_per_tree resolves its default);
    trees_per_prompt: trees (tree) or groups (flat/mix) per prompt; train_fraction and flat_steps:
    flat's trained share of steps and whose rule picks them; max_batch: most nodes per denoiser
    call (None/0 = no limit).
    """

    def __init__(self, policy, *, variant: str = "tree", num_steps: int = 10, k: int = 3, depth: int = 3,
                 noise_level: float = 0.7, group_size: int = 0, trees_per_prompt: int = 1,
                 train_fraction: float = 0.6, share_initial_noise: bool = False, logprob_reduction: str = "mean",
                 max_batch: int | None = None, flat_steps: str = "dancegrpo", keep_means: bool = False):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not 1 <= depth <= num_steps:
            raise ValueError(f"depth must be in [1, num_steps={num_steps}], got {depth}")
        if not 0 < train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {train_fraction}")
        if flat_steps not in FLAT_STEPS:
            raise ValueError(f"flat_steps must be one of {FLAT_STEPS}, got {flat_steps!r}")
        if variant != "tree" and group_size < 2:
            raise ValueError(f"flat/mix need group_size >= 2 trajectories per group, got {group_size}")
        if trees_per_prompt < 1:
            raise ValueError(f"trees_per_prompt must be >= 1, got {trees_per_prompt}")
        self.policy, self.variant = policy, variant
        self.num_steps, self.k, self.depth = num_steps, k, depth
        self.noise_level, self.reduction = float(noise_level), logprob_reduction
        self.group_size = group_size
        self.trees_per_prompt = trees_per_prompt
        self.train_fraction, self.share_initial_noise = train_fraction, share_initial_noise
        self.flat_steps = flat_steps
        self.max_batch = max_batch or None
        self.keep_means = keep_means  # record each decision's Gaussian mean (TreeBatch.old_means)
        self.sigmas = policy.sigmas(num_steps)  # (T+1,) float32 CPU
        self.nfe = 0  # transformer calls of the current `sample` (CFG pair = one)

    # ------------------------------------------------------------------ model calls
    def _predict(self, x: torch.Tensor, step: int, prompts: list[str]) -> torch.Tensor:
        """Guided denoiser output of all rows of x (B, C, H, W) at sigmas[step], in max_batch chunks."""
        b = x.shape[0]
        chunk = self.max_batch or b
        sigma = float(self.sigmas[step])
        parts = [self.policy.predict(x[s:s + chunk], torch.full((min(chunk, b - s),), sigma), prompts[s:s + chunk])
                 for s in range(0, b, chunk)]
        self.nfe += b
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _ode(self, x: torch.Tensor, prompts: list[str], steps: range) -> torch.Tensor:
        for i in steps:
            out = self._predict(x, i, prompts)
            x = self.policy.ode_step(x, out, float(self.sigmas[i]), float(self.sigmas[i + 1]))
        return x

    def _sde(self, x: torch.Tensor, prompts: list[str], step: int, n_children: int, gen: torch.Generator):
        out = self._predict(x, step, prompts)
        return self.policy.sde_step(x, out, float(self.sigmas[step]), float(self.sigmas[step + 1]), self.noise_level,
                                    generator=gen, n_children=n_children, reduction=self.reduction)

    def _noise(self, n: int, gen: torch.Generator) -> torch.Tensor:
        x = torch.randn((n, *self.policy.latent_shape), generator=gen, dtype=torch.float32)  # (n, C, H, W) CPU
        return x.to(self.policy.device)

    # ------------------------------------------------------------------ public
    @torch.no_grad()
    def sample(self, prompts: list[str], *, window_start: int, seed: int, policy_version: int = 0) -> TreeBatch:
        """Grow trees / trajectories for `prompts` (trees_per_prompt each). window_start is the
        SDE window's first step p (ignored by `flat`, which is stochastic everywhere)."""
        if isinstance(prompts, str) or not prompts:
            raise ValueError("sample needs a non-empty list of prompts")
        distinct = list(dict.fromkeys(prompts))
        prompt_ids = torch.tensor([distinct.index(p) for p in prompts], dtype=torch.long)  # (P,)
        gen = torch.Generator().manual_seed(int(seed))
        self.nfe = 0
        grow = self._grow_tree if self.variant == "tree" else self._grow_chains
        batch = grow(distinct, prompt_ids, window_start, gen)
        batch.policy_version, batch.nfe, batch.variant = int(policy_version), self.nfe, self.variant
        batch.window_start = int(window_start)
        return batch.validate()

    # ------------------------------------------------------------------ tree
    def _grow_tree(self, distinct, prompt_ids, p: int, gen) -> TreeBatch:
        k, d, t = self.k, self.depth, self.num_steps
        shape = build_tree(t, k, d, p)  # checks 0 <= p <= T - d
        root_prompt = prompt_ids.repeat_interleave(self.trees_per_prompt)  # (R,)
        r = root_prompt.shape[0]
        names = [distinct[i] for i in root_prompt.tolist()]
        x = self._ode(self._noise(r, gen), names, range(p))  # (R, C, H, W) shared prefix
        level = x[:, None]                                    # (R, 1, C, H, W)
        lat, kids, logps, means = [], [], [], []
        for j in range(d):
            n = k ** j
            flat = level.reshape(r * n, *x.shape[1:])        # (R*n, C, H, W), tree-major
            out = self._sde(flat, [s for s in names for _ in range(n)], p + j, k, gen)
            lat.append(flat.view(r, n, *x.shape[1:]))
            kids.append(out.sample.view(r, n, k, *x.shape[1:]))
            logps.append(out.log_prob.view(r, n, k))
            if self.keep_means:
                means.append(out.mean.view(r, n, *x.shape[1:]))
            level = out.sample.view(r, n * k, *x.shape[1:])  # children in breadth-first order
        leaves = self._ode(level.reshape(r * k ** d, *x.shape[1:]), [s for s in names for _ in range(k ** d)],
                           range(p + d, t))
        expected = r * count_nfe(t, k, d, p)
        if self.nfe != expected:
            raise RuntimeError(f"tree sampler spent {self.nfe} transformer calls, count_nfe says {expected}")
        batch = self._tree_batch(shape, distinct, root_prompt, torch.cat(lat, 1), torch.cat(kids, 1),
                                 torch.cat(logps, 1), leaves)
        return self._with_means(batch, torch.cat(means, 1) if means else None)

    def _tree_batch(self, shape, distinct, root_prompt, lat, kids, logp, leaves) -> TreeBatch:
        """lat (R, D, C, H, W), kids (R, D, k, C, H, W), logp (R, D, k), leaves (R*k**d, C, H, W)."""
        r, dn, k = logp.shape
        m = shape.num_nodes
        base = (torch.arange(r) * m)[:, None]                                  # (R, 1)
        child_node = (base[:, :, None] + torch.arange(dn)[None, :, None] * k + 1
                      + torch.arange(k)[None, None, :]).reshape(r * dn, k)      # (N, k)
        parent = torch.where(shape.parent >= 0, shape.parent[None] + base, -1).reshape(-1)  # (R*M,)
        node_log_prob = torch.zeros(r, m)
        node_log_prob[:, 1:] = logp.reshape(r, dn * k).cpu()  # node u*k+1+c is child c of decision u
        leaf_nodes = torch.arange(shape.leaves().start, shape.leaves().stop)
        return TreeBatch(
            prompts=distinct, sigmas=self.sigmas.clone(),
            latents=lat.reshape(r * dn, *lat.shape[2:]).cpu(),
            step_index=shape.step[:dn].repeat(r),
            children=kids.reshape(r * dn, k, *kids.shape[3:]).cpu(),
            old_log_probs=logp.reshape(r * dn, k).cpu(), child_node=child_node,
            decision_prompt=root_prompt.repeat_interleave(dn),
            parent=parent, node_log_prob=node_log_prob.reshape(-1),
            leaf_latents=leaves.cpu(), leaf_node=(base + leaf_nodes[None]).reshape(-1),
            leaf_prompt=root_prompt.repeat_interleave(k ** shape.tree_depth),
            tree_index=torch.arange(r).repeat_interleave(k ** shape.tree_depth))

    # ------------------------------------------------------------------ flat / mix
    def _schedule(self, p: int, rows: int, gen) -> tuple[set[int], torch.Tensor]:
        """(steps run as SDE, (rows, n) steps each trajectory records as decisions) for flat / mix."""
        t = self.num_steps
        if self.variant == "mix":
            build_tree(t, 2, self.depth, p)  # same window check as the tree
            return set(range(p, p + self.depth)), torch.arange(p, p + self.depth).repeat(rows, 1)
        return set(range(t)), flat_trained_steps(t, self.train_fraction, self.flat_steps, rows, gen)

    def _grow_chains(self, distinct, prompt_ids, p: int, gen) -> TreeBatch:
        g = self.group_size
        group_prompt = prompt_ids.repeat_interleave(self.trees_per_prompt)  # (groups,)
        traj_prompt = group_prompt.repeat_interleave(g)                     # (R,)
        sde_steps, trained = self._schedule(p, traj_prompt.shape[0], gen)   # trained (R, n)
        recorded = sorted(set(trained.flatten().tolist()))                  # steps any trajectory trains
        names = [distinct[i] for i in traj_prompt.tolist()]
        if self.share_initial_noise:
            x = self._noise(group_prompt.shape[0], gen).repeat_interleave(g, dim=0)  # (R, C, H, W)
        else:
            x = self._noise(traj_prompt.shape[0], gen)
        lat, kids, logps, means = [], [], [], []
        for i in range(self.num_steps):
            if i not in sde_steps:
                x = self._ode(x, names, range(i, i + 1))
                continue
            out = self._sde(x, names, i, 1, gen)
            if i in recorded:
                lat.append(x)
                kids.append(out.sample)     # (R, 1, C, H, W)
                logps.append(out.log_prob)  # (R, 1)
                if self.keep_means:
                    means.append(out.mean)  # (R, C, H, W)
            x = out.sample[:, 0]
        # each trajectory keeps its own trained steps out of the recorded ones
        pos = torch.searchsorted(torch.tensor(recorded), trained)   # (R, n) index into `recorded`
        rows = torch.arange(pos.shape[0])[:, None]                  # (R, 1); CPU indices work on any device

        def pick(xs: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(xs, 1)[rows, pos]                    # (R, n, ...)
        batch = self._chain_batch(distinct, traj_prompt, trained, pick(lat), pick(kids), pick(logps), x)
        return self._with_means(batch, pick(means) if means else None)

    @staticmethod
    def _with_means(batch: TreeBatch, means: torch.Tensor | None) -> TreeBatch:
        """means (R, n, C, H, W) in the decisions' order (only recorded with `keep_means`)."""
        if means is not None:
            batch.old_means = means.reshape(-1, *means.shape[2:]).float().cpu()
        return batch

    def _chain_batch(self, distinct, traj_prompt, trained, lat, kids, logp, leaves) -> TreeBatch:
        """trained (R, n) step indices, lat (R, n, C, H, W), kids (R, n, 1, C, H, W), logp (R, n, 1),
        leaves (R, C, H, W)."""
        r, n = logp.shape[:2]
        m = n + 1                                        # chain nodes per trajectory
        base = (torch.arange(r) * m)[:, None]            # (R, 1)
        parent = torch.cat([torch.full((r, 1), -1), base + torch.arange(n)[None]], 1)  # (R, n+1)
        node_log_prob = torch.cat([torch.zeros(r, 1), logp[:, :, 0].cpu()], 1)       # (R, n+1)
        return TreeBatch(
            prompts=distinct, sigmas=self.sigmas.clone(),
            latents=lat.reshape(r * n, *lat.shape[2:]).cpu(),
            step_index=trained.reshape(-1).long(),
            children=kids.reshape(r * n, 1, *kids.shape[3:]).cpu(),
            old_log_probs=logp.reshape(r * n, 1).cpu(),
            child_node=(base + 1 + torch.arange(n)[None]).reshape(r * n, 1),
            decision_prompt=traj_prompt.repeat_interleave(n),
            parent=parent.reshape(-1), node_log_prob=node_log_prob.reshape(-1),
            leaf_latents=leaves.cpu(), leaf_node=(base[:, 0] + n),
            leaf_prompt=traj_prompt.clone(),
            tree_index=torch.arange(r) // self.group_size)
