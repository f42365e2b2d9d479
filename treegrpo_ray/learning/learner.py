"""The GRPO learner step over tree edges (no Ray; Ray Train wraps it in actors/train_loop.py).

One iteration, as in the paper (TreeGRPO, Alg. 1):
  1. leaf rewards -> per-prompt normalised leaf advantages (algo/combine.py)
  2. leaf values -> node values by weighted averaging up the tree (algo.advantages.edge_advantages);
     the advantage of edge u -> c is V(c)
  3. for every decision u, ONE forward of the current policy at (x_u, t_u) gives mu_theta; the
     stored children are re-scored under it, ratio = exp(logp_new - logp_old), and the clipped
     surrogate is averaged over the K children and all decisions (algo.loss.grpo_clip_loss).
Departures: none in the maths; the update guard (skip non-finite or exploding updates, stop after
`max_bad_updates` in a row) is ours, so a bad batch never reaches the weights, and so is the
check that an optimizer step changed the policy's live weights at all (fingerprints before and
after: an optimizer bound to copies, or a learning rate below the weights' dtype resolution,
stops the run instead of training nothing). Mixed precision: bf16/fp16 trainable weights are
stepped through float32 masters (saved in state()), or, sharded (FSDP2, learning/sharding.py),
are float32 shards computing in bf16; trees older than the learner (max_staleness
>= 1) use decoupled PPO or are re-centred on the current means (`stale_correction`).
"""
from __future__ import annotations

import copy
import math
import statistics

import torch

from treegrpo_ray.algo.advantages import edge_advantages
from treegrpo_ray.algo.loss import flow_grpo_kl, grpo_clip_loss, kl_to_reference
from treegrpo_ray.algo.seeds import iteration_seed
from treegrpo_ray.learning import sharding
from treegrpo_ray.models.fingerprint import differing, digest, fingerprint
from treegrpo_ray.types import TreeBatch


STALE_CORRECTIONS = ("recenter", "decoupled", "none")


class TrainingDiverged(RuntimeError):
    """Raised after `max_bad_updates` consecutive skipped updates."""


class UpdateChangedNothing(TrainingDiverged):
    """An optimizer step with a non-zero gradient left every weight of the policy as it was."""


def decision_advantages(batch: TreeBatch, leaf_advantages: torch.Tensor, *, weighting: str = "uniform",
                        temperature: float = 1.0, baseline: str = "none") -> torch.Tensor:
    """Per-child advantages (N, K) from per-leaf advantages (L,): propagate leaf -> root, then
    read the value of each decision's children. Leaves whose reward was dropped (NaN) given
    the neutral value 0 (they push neither way); their siblings still train.

    baseline="none":   A(u -> c) = V(c), the paper's edge advantage.
    baseline="parent": A(u -> c) = V(c) - V(u), each child against its siblings. V(u) was settled
        by the decisions above u, so in V(c) it is noise for u's own choice; subtracting it keeps
        the expected gradient (up to the factor (K-1)/K of a group mean that includes the child,
        as in GRPO) and removes that noise. Only for decisions with K >= 2 children (trees).
    """
    m = batch.parent.shape[0]
    leaf_values = torch.full((m,), float("nan"))
    leaf_values[batch.leaf_node] = leaf_advantages.float().cpu()
    dropped = ~torch.isfinite(leaf_values[batch.leaf_node])
    if dropped.any():
        leaf_values[batch.leaf_node[dropped]] = 0.0  # neutral value: no push either way
    values = edge_advantages(batch.parent, leaf_values, weighting=weighting,
                             log_probs=batch.node_log_prob if weighting == "softmax" else None,
                             temperature=temperature)
    adv = values[batch.child_node]  # (N, K)
    if baseline == "parent":
        if batch.child_node.shape[1] < 2:
            raise ValueError("baseline='parent' needs decisions with K >= 2 children; a chain (flat/mix) "
                             "would get advantage 0 everywhere")
        adv = adv - values[batch.parent[batch.child_node[:, 0]]][:, None]
    elif baseline != "none":
        raise ValueError(f"baseline must be 'none' or 'parent', got {baseline!r}")
    return adv


class GRPOLearner:
    """Owns the optimizer; `update()` runs one iteration's epochs x minibatches of GRPO steps on
    this worker's shard of decisions. `module` is the (possibly DDP-wrapped) trainable model."""

    def __init__(self, policy, *, module=None, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 clip_eps: float = 0.2, weighting: str = "uniform", temperature: float = 1.0, baseline: str = "none",
                 kl_beta: float = 0.0, kl_form: str = "flow_grpo",
                 grad_clip: float = 1.0, minibatches: int = 1, epochs: int = 1, micro_batch: int = 0,
                 noise_level: float = 0.7, logprob_reduction: str = "mean", max_bad_updates: int = 3,
                 explode_factor: float = 100.0, stale_correction: str = "recenter", cfg_grad: str = "both",
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        self.policy, self.module = policy, module
        self.sharded = sharding.is_sharded(module)  # FSDP2: the float32 shards are the masters
        self.params = [p for p in policy.trainable_parameters() if p.requires_grad]
        # bf16/fp16 trainable weights train through float32 master copies (mixed precision): the
        # optimizer steps the masters and the model gets them rounded, so steps smaller than the
        # weights' resolution accumulate instead of rounding away. float32 weights (and LoRA
        # adapters, always float32) are stepped in place.
        low = any(p.dtype != torch.float32 for p in self.params)
        self.masters = [p.detach().float().clone() for p in self.params] if low else None
        self._synced = None  # fingerprint of the live weights as the masters last wrote them
        self.optimizer = torch.optim.AdamW(self.masters or self.params, lr=lr, weight_decay=weight_decay,
                                           betas=tuple(betas))
        self.clip_eps, self.weighting, self.temperature, self.kl_beta = clip_eps, weighting, temperature, kl_beta
        if kl_form not in ("flow_grpo", "exact"):
            raise ValueError(f"kl_form must be 'flow_grpo' or 'exact', got {kl_form!r}")
        self.kl_form = kl_form
        self.baseline = baseline
        self.grad_clip, self.minibatches, self.epochs, self.micro_batch = grad_clip, minibatches, epochs, micro_batch
        self.noise_level, self.reduction = noise_level, logprob_reduction
        self.max_bad_updates, self.explode_factor = max_bad_updates, explode_factor
        if stale_correction not in STALE_CORRECTIONS:
            raise ValueError(f"stale_correction must be one of {STALE_CORRECTIONS}, got {stale_correction!r}")
        self.stale_correction = stale_correction
        if cfg_grad not in ("both", "cond"):
            raise ValueError(f"cfg_grad must be 'both' or 'cond', got {cfg_grad!r}")
        self.cfg_grad = cfg_grad
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.bad_in_a_row, self.skipped_total, self.version = 0, 0, 0
        self._norms: list[float] = []

    # -- one iteration -------------------------------------------------------------------------
    def update(self, batch: TreeBatch, leaf_advantages: torch.Tensor, iteration: int = 0) -> dict[str, float]:
        adv = decision_advantages(batch, leaf_advantages, weighting=self.weighting, temperature=self.temperature,
                                  baseline=self.baseline)
        n = batch.num_decisions
        if n % (self.world_size * self.minibatches):
            raise ValueError(f"{n} decisions do not split into {self.world_size} workers x {self.minibatches} "
                             "minibatches; the config check should have caught this (learner.minibatches)")
        device = self._device()
        metrics: list[dict[str, float]] = []
        before = fingerprint(self.policy.live_state())
        if self.masters is not None and (self._synced is None or differing(self._synced, before)):
            self._resync_masters()  # first update, or weights loaded since (resume, a restarted worker)
        before_masters = fingerprint(self._master_state()) if self.masters is not None else None
        gen = torch.Generator().manual_seed(iteration_seed(self.seed, iteration))
        lag = self.version - batch.policy_version
        order = [torch.randperm(n, generator=gen) for _ in range(self.epochs)]  # same on every rank (same seed)
        mine = [o[self.rank::self.world_size] for o in order]
        used = torch.cat(mine).unique()  # every edge this worker trains on, over all epochs
        prox = shift = None
        if lag > 0 and self.stale_correction == "decoupled":
            prox = self._proximal_log_probs(batch, used, device)
        elif lag > 0 and self.stale_correction == "recenter":
            shift, moved = self._recenter_shift(batch, used, device)
        for rows_of_epoch in mine:
            for rows in rows_of_epoch.chunk(self.minibatches):
                metrics.append(self._step(batch, adv, rows, device, prox, shift))
        after = fingerprint(self.policy.live_state())
        if self.masters is None:
            self._check_changed(before, after, metrics, bool(adv.abs().sum() > 0))
        else:  # what must change is the float32 state the optimizer steps; bf16 may round a small step away
            self._synced = after
            self._check_changed(before_masters, fingerprint(self._master_state()), metrics, bool(adv.abs().sum() > 0))
        self.version += 1
        out = {k: sum(m[k] for m in metrics) / len(metrics) for k in metrics[0]}
        out["weights/fingerprint"] = float(int(digest(after), 16))  # 48 bits: exact as a float64 metric
        out["learner/skipped_updates"] = float(sum(m["learner/skipped"] for m in metrics))
        # the first minibatch is on-policy: its clipping is noise (ratio != 1 by numerics alone); the
        # later ones clip because the earlier steps moved the policy
        out["loss/clip_frac_first"] = metrics[0]["loss/clip_frac"]
        if len(metrics) > 1:
            out["loss/clip_frac_later"] = sum(m["loss/clip_frac"] for m in metrics[1:]) / (len(metrics) - 1)
        out["learner/decisions"] = float(n)
        out["adv/mean"], out["adv/abs_mean"] = float(adv.mean()), float(adv.abs().mean())
        out["staleness/lag"] = float(lag)
        if prox is not None:
            w = self._weights(batch, prox, used)
            out["staleness/is_weight_mean"], out["staleness/is_weight_max"] = float(w.mean()), float(w.max())
        if shift is not None:  # how far the means moved over the lag, in units of each step's noise std
            out["staleness/shift_over_std"] = moved
        return out

    def _master_state(self) -> dict[str, torch.Tensor]:
        return {str(i): m for i, m in enumerate(self.masters)}

    @torch.no_grad()
    def _resync_masters(self) -> None:
        for m, p in zip(self.masters, self.params):
            m.copy_(p.float())
        self._synced = fingerprint(self.policy.live_state())

    def _proximal_log_probs(self, batch: TreeBatch, rows: torch.Tensor, device) -> torch.Tensor:
        """Decoupled PPO's proximal log-probs: this worker's edges re-scored, without gradient, under
        the weights the update starts from. (N, K), filled at `rows` (NaN elsewhere)."""
        prox = torch.full_like(batch.old_log_probs, float("nan"))
        for chunk, new in self._rescored_chunks(batch, rows, device):
            prox[chunk] = new.log_prob.float().cpu()
        return prox

    def _rescored_chunks(self, batch: TreeBatch, rows: torch.Tensor, device):
        """(chunk, SDEStep) of `rows` under the current weights, no gradient, micro_batch at a time."""
        for chunk in rows.split(self.micro_batch) if self.micro_batch else (rows,):
            with torch.no_grad():
                yield chunk, self._rescore(batch, chunk, device)[0]

    def _recenter_shift(self, batch: TreeBatch, rows: torch.Tensor, device) -> tuple[torch.Tensor, float]:
        """stale_correction=recenter: mu_prox - mu_tree per decision (N, C, H, W; NaN outside `rows`),
        and its mean RMS over `rows` in units of each decision's std s.

        A stale child is c = mu_tree + s*eps. The learner trains on c' = c + (mu_prox - mu_tree) =
        mu_prox + s*eps instead: the child the weights the update starts from would have drawn with
        the same noise, under which its log-prob is the tree's own (s does not depend on the weights).
        The clip is then against the tree's log-probs with ratio 1 at the start, as on-policy, and
        the score no longer carries the lag's (mu_tree - mu_theta) / s^2 term, which the decoupled
        weights (pi_prox / pi_tree near 1 for per-element-mean log-probs) leave in. What remains
        is the reward of c standing in for that of c': second order in the shift."""
        if not batch.old_means.numel():
            raise ValueError("stale_correction=recenter needs the sampler's means (TreeBatch.old_means); the "
                             "samplers were built without keep_means (builders.build_sampler sets it when "
                             "max_staleness >= 1 and learner.stale_correction=recenter)")
        shift = torch.full_like(batch.latents, float("nan"), dtype=torch.float32)
        moved = []
        for chunk, new in self._rescored_chunks(batch, rows, device):
            shift[chunk] = new.mean.float().cpu() - batch.old_means[chunk].float()
            latent_dims = tuple(range(1, shift.dim()))  # (C, H, W), or (C, F, H, W) for video
            moved.append(shift[chunk].pow(2).mean(latent_dims).sqrt() / new.std.float().cpu().reshape(-1))
        return shift, float(torch.cat(moved).mean())

    @staticmethod
    def _weights(batch: TreeBatch, prox: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """pi_prox / pi_behaviour per edge of `rows`: the importance weight of a stale tree's edge."""
        return (prox[rows] - batch.old_log_probs[rows].float()).exp()

    def _check_changed(self, before, after, metrics: list[dict[str, float]], signal: bool) -> None:
        """Stop if the update could not have trained the model: advantages but no gradient at the
        optimizer's tensors, or steps that left every live weight as it was."""
        applied = [m for m in metrics if not m["learner/skipped"]]
        if signal and applied and all(m["learner/grad_norm"] == 0 for m in applied):
            raise UpdateChangedNothing(
                f"update {self.version + 1} had non-zero advantages but no gradient reached the optimizer's "
                f"{len(self.params)} tensors: they are not the ones the policy's forward pass uses (a wrapper or copy "
                "of its parameters), or every trainable parameter is frozen.")
        stepped = [m["learner/grad_norm"] for m in applied if m["learner/grad_norm"] > 0]
        lr = max((g["lr"] for g in self.optimizer.param_groups), default=0.0)
        if stepped and lr > 0 and not differing(before, after):
            dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in self.masters or self.params})
            raise UpdateChangedNothing(
                f"update {self.version + 1} took {len(stepped)} optimizer steps (grad norm up to {max(stepped):.3g}) "
                "but no weight of the policy's denoiser changed. Either the optimizer holds tensors the model does "
                f"not run (a wrapper or copy of its parameters), or learner.lr={lr:g} is below what the weights' dtype "
                f"({', '.join(dtypes)}) can represent: train in model.dtype=float32 or raise learner.lr.")

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _step(self, batch: TreeBatch, adv: torch.Tensor, rows: torch.Tensor, device,
              prox: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        if self.masters is not None:
            for p in self.params:
                p.grad = None
        chunks = rows.split(self.micro_batch) if self.micro_batch else (rows,)
        totals: dict[str, float] = {}
        for i, chunk in enumerate(chunks):
            with sharding.no_sync(self.module, i < len(chunks) - 1):  # reduce once, after the last
                loss, m = self._loss(batch, adv, chunk, device, prox, shift)
                (loss * chunk.numel() / rows.numel()).backward()
            for k, v in m.items():
                totals[k] = totals.get(k, 0.0) + v * chunk.numel() / rows.numel()
        totals.update(self._apply_gradients())
        return totals

    def _rescore(self, batch: TreeBatch, rows: torch.Tensor, device, shift: torch.Tensor | None = None):
        """The stored children of decisions `rows` scored under the current weights: (SDEStep, inputs).
        shift (N, C, H, W): moved by shift[rows] first (stale_correction=recenter)."""
        latents = batch.latents[rows].to(device)                      # (n, C, H, W)
        children = batch.children[rows].to(device)                    # (n, K, C, H, W)
        if shift is not None:
            children = children + shift[rows].to(device=device, dtype=children.dtype)[:, None]
        step = batch.step_index[rows]
        sigma, sigma_next = batch.sigmas[step].to(device), batch.sigmas[step + 1].to(device)  # (n,)
        prompts = [batch.prompts[j] for j in batch.decision_prompt[rows].tolist()]
        out = self.policy.predict(latents, sigma, prompts, module=self.module, uncond_grad=self.cfg_grad == "both")
        new = self.policy.sde_step(latents, out, sigma, sigma_next, self.noise_level, prev_sample=children,
                                   reduction=self.reduction)
        return new, (latents, children, sigma, sigma_next, prompts)

    def _loss(self, batch: TreeBatch, adv: torch.Tensor, rows: torch.Tensor, device, prox: torch.Tensor | None = None,
              shift: torch.Tensor | None = None):
        new, (latents, children, sigma, sigma_next, prompts) = self._rescore(batch, rows, device, shift)
        if prox is None:   # on-policy, correction off, or recentred children: clip against the tree's log-probs
            loss, metrics = grpo_clip_loss(new.log_prob, batch.old_log_probs[rows].to(device), adv[rows].to(device),
                                           self.clip_eps)
        else:              # stale trees: clip against the proximal policy, weight by pi_prox / pi_behaviour
            loss, metrics = grpo_clip_loss(new.log_prob, prox[rows].to(device), adv[rows].to(device), self.clip_eps,
                                           weights=self._weights(batch, prox, rows).to(device))
        metrics = {f"loss/{k}": v for k, v in metrics.items()}
        metrics["loss/policy"] = float(loss.detach())
        if self.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                out_ref = self.policy.predict(latents, sigma, prompts)
            ref = self.policy.sde_step(latents, out_ref, sigma, sigma_next, self.noise_level, prev_sample=children,
                                       reduction=self.reduction)
            kl = (flow_grpo_kl(new.mean, ref.mean, new.std, sigma_next - sigma) if self.kl_form == "flow_grpo"
                  else kl_to_reference(new.mean, ref.mean, new.std)).mean()
            loss = loss + self.kl_beta * kl
            metrics["loss/kl_ref"] = float(kl.detach())
        metrics["loss/total"] = float(loss.detach())
        return loss, metrics

    def _apply_gradients(self) -> dict[str, float]:
        """Clip, check, step, or skip. Grads are already all-reduced by DDP, so every rank sees the
        same norm and takes the same decision."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        if self.masters is not None:  # the model's (all-reduced) low-precision grads -> float32 on the masters
            for m, p in zip(self.masters, self.params):
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None
        norm = sharding.clip_grad_norm(self.masters or self.params, max_norm)
        median = statistics.median(self._norms) if len(self._norms) >= 5 else math.inf
        bad = not math.isfinite(norm) or norm > self.explode_factor * median
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            self.skipped_total += 1
            if self.bad_in_a_row >= self.max_bad_updates:
                raise TrainingDiverged(f"{self.bad_in_a_row} consecutive updates skipped (last grad norm {norm}); "
                                       "weights were left untouched. Lower learner.lr or check the rewards.")
        else:
            self.optimizer.step()
            if self.masters is not None:
                with torch.no_grad():
                    for m, p in zip(self.masters, self.params):
                        p.copy_(m)  # rounded to the model's dtype
            self.bad_in_a_row = 0
            self._norms = (self._norms + [norm])[-50:]
        return {"learner/grad_norm": norm if math.isfinite(norm) else -1.0, "learner/skipped": float(bad)}

    # -- checkpoint state ----------------------------------------------------------------------
    def state(self) -> dict:
        """The optimizer's state in one worker's format (index-keyed; gathered when sharded, a
        collective then), so any worker count and strategy resumes from it."""
        optimizer = (sharding.full_optimizer_state(self.module, self.optimizer, self.policy.trainable_names())
                     if self.sharded else self.optimizer.state_dict())
        state = {"optimizer": optimizer, "version": self.version,
                 "bad_in_a_row": self.bad_in_a_row, "skipped_total": self.skipped_total, "norms": list(self._norms)}
        if self.masters is not None:
            state["masters"] = [m.detach().cpu().clone() for m in self.masters]
        elif self.sharded and self.policy.dtype != torch.float32:  # the float32 shards are the masters
            masters = []
            for p in self.params:  # gathered one at a time on every rank; rank 0 keeps them
                whole = p.full_tensor().detach()
                if self.rank == 0:
                    masters.append(whole.cpu())
            if self.rank == 0:
                state["masters"] = masters
        return state

    def load_state(self, state: dict) -> None:
        if self.sharded:
            sharding.load_full_optimizer_state(self.module, self.optimizer, state["optimizer"],
                                               self.policy.trainable_names())
        else:
            self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))  # torch may alias same-device tensors
        self.version = int(state["version"])
        self.bad_in_a_row, self.skipped_total = int(state["bad_in_a_row"]), int(state["skipped_total"])
        self._norms = [float(x) for x in state["norms"]]
        if self.sharded and "masters" in state:  # float32 weights saved beside the bf16 model: the shards' own
            sharding.load_full_state(self.module, dict(zip(self.policy.trainable_names(), state["masters"])),
                                     strict=False)
        if self.masters is not None:  # the float32 weights saved with the model they round to
            if "masters" in state and len(state["masters"]) == len(self.masters):
                with torch.no_grad():
                    for m, saved in zip(self.masters, state["masters"]):
                        m.copy_(saved)
                self._synced = fingerprint(self.policy.live_state())
            else:
                self._resync_masters()
