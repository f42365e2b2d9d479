"""Typed data contracts between the stages (sampler -> reward pool -> learner).

One representation serves all three variants (`tree`, `flat`, `mix`):

* A **node** is a latent state inside the stochastic part of a trajectory. Nodes form a forest:
  ``parent[m]`` is the index of node m's parent, or -1 for a root (the node at the window start
  for `tree`; the first trained state of each trajectory for `flat`/`mix`).
* A **decision** is a node that was expanded with one SDE step: one model forward gave the
  Gaussian N(mu, s^2) and ``K`` children were drawn from it (K = k for `tree`, 1 for `flat`/`mix`).
  Decisions are what the learner trains on: one forward per decision, K log-probs per forward.
* A **leaf** is the final latent after the deterministic (ODE) tail, one per deepest node;
  ``leaf_node[l]`` is the node the leaf grew from (the leaf inherits that node's value).

The value of every node comes from `algo.advantages.node_values(parent, leaf_values)` and
the advantage of the edge decision -> child is the value of the child node.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch


@dataclass
class TreeBatch:
    """Everything a sampler produced in one call. Shapes: N decisions, K children per decision,
    M nodes, L leaves, (C, H, W) latent shape ((C, F, H, W) for video), T denoising steps."""

    prompts: list[str]            # the distinct prompts of this batch; indices below point here
    sigmas: torch.Tensor          # (T+1,) float32 noise levels, sigmas[0] = 1 (noise) ... sigmas[T] = 0
    # decisions (training units)
    latents: torch.Tensor         # (N, C, H, W) state x_u the decision was taken from
    step_index: torch.Tensor      # (N,) long, i: the step went sigmas[i] -> sigmas[i+1]
    children: torch.Tensor        # (N, K, C, H, W) sampled children x_c
    old_log_probs: torch.Tensor   # (N, K) float32 log-prob of each child under the sampling policy
    child_node: torch.Tensor      # (N, K) long, node index of each child
    decision_prompt: torch.Tensor  # (N,) long, index into `prompts`
    # node forest
    parent: torch.Tensor          # (M,) long, parent node index or -1
    node_log_prob: torch.Tensor   # (M,) float32 old log-prob of the edge into the node (0 for roots)
    # leaves
    leaf_latents: torch.Tensor    # (L, C, H, W) final latents, decoded and scored by the reward pool
    leaf_node: torch.Tensor       # (L,) long, node each leaf grew from
    leaf_prompt: torch.Tensor     # (L,) long, index into `prompts`
    tree_index: torch.Tensor      # (L,) long, which tree/group (unique across a merged batch)
    # the sampling Gaussian's mean of each decision, kept only for learner.stale_correction=recenter
    # (a stale child's noise is (child - mean) / std); empty (0,) otherwise
    old_means: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (N, C, H, W) float32 or (0,)
    # bookkeeping
    policy_version: int = 0       # version of the weights that grew this batch
    nfe: int = 0                  # transformer calls actually spent (CFG pair counts as one)
    variant: str = "tree"
    window_start: int = -1        # the SDE window's first step p the sampler was asked for (flat ignores it)

    @property
    def num_decisions(self) -> int:
        return self.latents.shape[0]

    @property
    def num_leaves(self) -> int:
        return self.leaf_latents.shape[0]

    def validate(self) -> "TreeBatch":
        """Check shapes and index ranges; raise ValueError naming the field at fault."""
        n, m, l = self.latents.shape[0], self.parent.shape[0], self.leaf_latents.shape[0]
        if self.children.dim() != self.latents.dim() + 1 or self.children.shape[0] != n:
            raise ValueError(f"TreeBatch.children must be (N, K, *latent) with N={n} and latents "
                             f"{tuple(self.latents.shape)}, got {tuple(self.children.shape)}")
        k = self.children.shape[1]
        if self.children.shape[2:] != self.latents.shape[1:]:
            raise ValueError("TreeBatch.children latent shape differs from TreeBatch.latents")
        for name, t, shape in (("old_log_probs", self.old_log_probs, (n, k)), ("child_node", self.child_node, (n, k)),
                               ("step_index", self.step_index, (n,)), ("decision_prompt", self.decision_prompt, (n,)),
                               ("node_log_prob", self.node_log_prob, (m,)), ("leaf_node", self.leaf_node, (l,)),
                               ("leaf_prompt", self.leaf_prompt, (l,)), ("tree_index", self.tree_index, (l,))):
            if tuple(t.shape) != shape:
                raise ValueError(f"TreeBatch.{name} must have shape {shape}, got {tuple(t.shape)}")
        for name, t, hi in (("child_node", self.child_node, m), ("leaf_node", self.leaf_node, m),
                            ("decision_prompt", self.decision_prompt, len(self.prompts)),
                            ("leaf_prompt", self.leaf_prompt, len(self.prompts)),
                            ("step_index", self.step_index, self.sigmas.shape[0] - 1)):
            if t.numel() and (int(t.min()) < 0 or int(t.max()) >= hi):
                raise ValueError(f"TreeBatch.{name} has indices outside [0, {hi})")
        if m and (int(self.parent.max()) >= m or int(self.parent.min()) < -1):
            raise ValueError("TreeBatch.parent has indices outside [-1, M)")
        if self.old_means.numel() and tuple(self.old_means.shape) != tuple(self.latents.shape):
            raise ValueError(f"TreeBatch.old_means must be empty or shaped like latents {tuple(self.latents.shape)}, "
                             f"got {tuple(self.old_means.shape)}")
        if not torch.isfinite(self.old_log_probs).all():
            raise ValueError("TreeBatch.old_log_probs contains NaN/inf: the sampler produced a degenerate step")
        return self

    def to(self, device) -> "TreeBatch":
        moved = {f: getattr(self, f).to(device) for f in _TENSOR_FIELDS}
        return replace(self, **moved)

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's tensors (what moves when the batch moves)."""
        return sum(getattr(self, f).nbytes for f in _TENSOR_FIELDS)

    def info(self, leaf_bytes: int = 0) -> "BatchInfo":
        """The driver's view of this batch: no latents. leaf_bytes: of leaf latents already split off."""
        trees = int(self.tree_index.max()) + 1 if self.tree_index.numel() else 0
        return BatchInfo(prompts=list(self.prompts), leaf_prompt=self.leaf_prompt.clone(),
                         policy_version=self.policy_version, nfe=self.nfe, num_decisions=self.num_decisions,
                         trees=trees, nbytes=self.nbytes + leaf_bytes, leaf_bytes=leaf_bytes,
                         window_start=self.window_start)


@dataclass(frozen=True)
class CallReport:
    """What a sampler actor says about one call, beside the batch it grew (Ray; None in-process)."""
    sample_s: float               # busy seconds: loading the weights and growing the trees
    restarted: bool               # the actor was restarted (Ray) since its previous call
    weights_verified: bool        # the weights it grew with matched their publish fingerprint


@dataclass
class BatchInfo:
    """What the driver needs of a TreeBatch to normalise rewards, drop stale trees and log: no
    latents (the batch itself goes sampler -> object store -> learner by reference)."""
    prompts: list[str]
    leaf_prompt: torch.Tensor     # (L,) long, index into `prompts`
    policy_version: int
    nfe: int
    num_decisions: int
    trees: int                    # trees (groups) in the batch
    nbytes: int                   # the batch's tensor bytes, leaf latents included
    leaf_bytes: int = 0           # of which leaf latents (they go to the reward pool, not the learner)
    window_start: int = -1        # as TreeBatch.window_start
    call: CallReport | None = None  # the sampler call's own report (Ray)

    @property
    def num_leaves(self) -> int:
        return self.leaf_prompt.shape[0]

    @property
    def payload_bytes(self) -> int:
        """Bytes of its tensors and prompt text: what fetching it moves, less pickle's framing."""
        return self.leaf_prompt.nbytes + sum(len(p.encode()) for p in self.prompts)


_TENSOR_FIELDS = ("sigmas", "latents", "step_index", "children", "old_log_probs", "child_node", "decision_prompt",
                  "parent", "node_log_prob", "leaf_latents", "leaf_node", "leaf_prompt", "tree_index", "old_means")


def union_prompts(prompt_lists: list[list[str]]) -> tuple[list[str], list[torch.Tensor]]:
    """Distinct prompts in first-seen order, and per list the map from its indices to theirs."""
    prompts: list[str] = []
    index: dict[str, int] = {}
    for ps in prompt_lists:
        for p in ps:
            if p not in index:
                index[p] = len(prompts)
                prompts.append(p)
    return prompts, [torch.tensor([index[p] for p in ps], dtype=torch.long) for ps in prompt_lists]


def merge_infos(infos: list[BatchInfo]) -> BatchInfo:
    """The BatchInfo of `merge_batches` of the same batches, in the same order: the driver's
    leaf order and prompt indices are the learner's."""
    if not infos:
        raise ValueError("merge_infos needs at least one BatchInfo")
    prompts, remaps = union_prompts([i.prompts for i in infos])
    leaf_prompt = torch.cat([remap[i.leaf_prompt] if i.leaf_prompt.numel() else i.leaf_prompt
                             for i, remap in zip(infos, remaps)])
    return BatchInfo(prompts=prompts, leaf_prompt=leaf_prompt, policy_version=min(i.policy_version for i in infos),
                     nfe=sum(i.nfe for i in infos), num_decisions=sum(i.num_decisions for i in infos),
                     trees=sum(i.trees for i in infos), nbytes=sum(i.nbytes for i in infos),
                     leaf_bytes=sum(i.leaf_bytes for i in infos), window_start=infos[0].window_start)


def merge_batches(batches: list[TreeBatch]) -> TreeBatch:
    """Concatenate sampler outputs of one iteration into one batch, re-basing node, prompt and
    tree indices. Prompts are de-duplicated by string so per-prompt normalisation sees every leaf
    of a prompt, whichever sampler grew it. All batches must share sigmas, K and variant."""
    if not batches:
        raise ValueError("merge_batches needs at least one TreeBatch")
    prompts, remaps = union_prompts([b.prompts for b in batches])
    if len({bool(b.old_means.numel()) for b in batches if b.num_decisions}) > 1:
        raise ValueError("merge_batches: some batches keep old_means and some do not (samplers built from "
                         "different configs)")
    parts = {f: [] for f in _TENSOR_FIELDS if f != "sigmas"}
    node_off = tree_off = 0
    for b, remap in zip(batches, remaps):
        if not torch.equal(b.sigmas, batches[0].sigmas) or b.variant != batches[0].variant:
            raise ValueError("merge_batches: batches disagree on sigmas or variant")
        parts["latents"].append(b.latents)
        parts["step_index"].append(b.step_index)
        parts["children"].append(b.children)
        parts["old_log_probs"].append(b.old_log_probs)
        parts["child_node"].append(b.child_node + node_off)
        parts["decision_prompt"].append(remap[b.decision_prompt] if b.decision_prompt.numel() else b.decision_prompt)
        parts["parent"].append(torch.where(b.parent >= 0, b.parent + node_off, b.parent))
        parts["node_log_prob"].append(b.node_log_prob)
        parts["leaf_latents"].append(b.leaf_latents)
        parts["leaf_node"].append(b.leaf_node + node_off)
        parts["leaf_prompt"].append(remap[b.leaf_prompt] if b.leaf_prompt.numel() else b.leaf_prompt)
        parts["tree_index"].append(b.tree_index + tree_off)
        if b.old_means.numel():
            parts["old_means"].append(b.old_means)
        node_off += b.parent.shape[0]
        tree_off += int(b.tree_index.max()) + 1 if b.tree_index.numel() else 0
    merged = TreeBatch(prompts=prompts, sigmas=batches[0].sigmas,
                       **{f: torch.cat(v) if v else torch.empty(0) for f, v in parts.items()},
                       policy_version=min(b.policy_version for b in batches), nfe=sum(b.nfe for b in batches),
                       variant=batches[0].variant)
    return merged.validate()
