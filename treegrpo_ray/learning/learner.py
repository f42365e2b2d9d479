"""The GRPO learner step over tree edges (no Ray; Ray Train wraps it in actors/train_loop.py).

One iteration, as in the paper (TreeGRPO, Alg. 1):
  1. leaf rewards -> per-prompt normalised leaf advantages (the driver: algo.advantages.leaf_advantages)
  2. leaf values -> node values by weighted averaging up the tree, the advantage of edge u -> c is
     V(c) (algo.advantages.child_advantages)
  3. for every decision u, ONE forward of the current policy at (x_u, t_u) gives mu_theta; the
     stored children are re-scored under it, ratio = exp(logp_new - logp_old), and the clipped
     surrogate is averaged over the K children and all decisions (algo.loss.grpo_clip_loss).
Departures: none in the maths; the update guard (skip non-finite or exploding updates, stop after
`max_bad_updates` in a row) is ours, so a bad batch never reaches the weights, and so is the
check that an optimizer step changed the policy's live weights at all (fingerprints before and
after: an optimizer bound to copies, or a learning rate below the weights' dtype resolution,
stops the run instead of training nothing).

Chosen once, when the learner is built: how weights are stepped (`learning/precision.py`: in
place, float32 masters of bf16 weights, or FSDP2's float32 shards), what trees older than the
learner train against (`learning/staleness.py`: recenter, decoupled PPO or none), and the KL form.
"""
from __future__ import annotations

import math
import statistics

import torch

from treegrpo_ray.algo.advantages import child_advantages
from treegrpo_ray.algo.loss import KL_FORMS, STALE_CORRECTIONS, flow_grpo_kl, grpo_clip_loss, kl_to_reference
from treegrpo_ray.algo.seeds import iteration_seed
from treegrpo_ray.learning import sharding
from treegrpo_ray.learning.precision import precision_for
from treegrpo_ray.learning.staleness import CORRECTIONS, Correction
from treegrpo_ray.models.fingerprint import differing, digest, fingerprint
from treegrpo_ray.types import TreeBatch


class TrainingDiverged(RuntimeError):
    """Raised after `max_bad_updates` consecutive skipped updates."""


class UpdateChangedNothing(TrainingDiverged):
    """An optimizer step with a non-zero gradient left every weight of the policy as it was."""


def _flow_grpo_kl(new, ref, sigma, sigma_next):
    return flow_grpo_kl(new.mean, ref.mean, new.std, sigma_next - sigma)


def _exact_kl(new, ref, sigma, sigma_next):
    return kl_to_reference(new.mean, ref.mean, new.std)


KL = {"flow_grpo": _flow_grpo_kl, "exact": _exact_kl}


class GRPOLearner:
    """Owns the optimizer; `update()` runs one iteration's epochs x minibatches of GRPO steps on
    this worker's shard of decisions. `module` is the (possibly DDP-wrapped or sharded) trainable model."""

    def __init__(self, policy, *, module=None, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                 clip_eps: float = 0.2, weighting: str = "uniform", temperature: float = 1.0, baseline: str = "none",
                 kl_beta: float = 0.0, kl_form: str = "flow_grpo",
                 grad_clip: float = 1.0, minibatches: int = 1, epochs: int = 1, micro_batch: int = 0,
                 noise_level: float = 0.7, logprob_reduction: str = "mean", max_bad_updates: int = 3,
                 explode_factor: float = 100.0, stale_correction: str = "recenter", guidance_grad: str = "both",
                 rank: int = 0, world_size: int = 1, seed: int = 0):
        if kl_form not in KL_FORMS:
            raise ValueError(f"kl_form must be one of {KL_FORMS}, got {kl_form!r}")
        if stale_correction not in STALE_CORRECTIONS:
            raise ValueError(f"stale_correction must be one of {STALE_CORRECTIONS}, got {stale_correction!r}")
        if guidance_grad not in ("both", "cond"):
            raise ValueError(f"guidance_grad must be 'both' or 'cond', got {guidance_grad!r}")
        self.policy, self.module = policy, module
        self.params = [p for p in policy.trainable_parameters() if p.requires_grad]
        self.precision = precision_for(policy, module, self.params, rank)
        self.sharded = sharding.is_sharded(module)
        self.optimizer = torch.optim.AdamW(self.precision.optimized(), lr=lr, weight_decay=weight_decay,
                                           betas=tuple(betas))
        self.correct = CORRECTIONS[stale_correction]
        self.kl = KL[kl_form]
        self.clip_eps, self.weighting, self.temperature, self.kl_beta = clip_eps, weighting, temperature, kl_beta
        self.baseline, self.uncond_grad = baseline, guidance_grad == "both"
        self.grad_clip, self.minibatches, self.epochs, self.micro_batch = grad_clip, minibatches, epochs, micro_batch
        self.noise_level, self.reduction = noise_level, logprob_reduction
        self.max_bad_updates, self.explode_factor = max_bad_updates, explode_factor
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.bad_in_a_row, self.skipped_total, self.version = 0, 0, 0
        self._norms: list[float] = []

    # -- one iteration -------------------------------------------------------------------------
    def update(self, batch: TreeBatch, leaf_advantages: torch.Tensor, iteration: int = 0) -> dict[str, float]:
        adv = child_advantages(batch, leaf_advantages, weighting=self.weighting, temperature=self.temperature,
                               baseline=self.baseline)                                    # (N, K)
        n = batch.num_decisions
        if n % (self.world_size * self.minibatches):
            raise ValueError(f"{n} decisions do not split into {self.world_size} workers x {self.minibatches} "
                             "minibatches; the config check should have caught this (learner.minibatches)")
        device = self._device()
        before = self.precision.start(fingerprint(self.policy.live_state()))
        gen = torch.Generator().manual_seed(iteration_seed(self.seed, iteration))
        lag = self.version - batch.policy_version
        order = [torch.randperm(n, generator=gen) for _ in range(self.epochs)]  # same on every rank (same seed)
        mine = [o[self.rank::self.world_size] for o in order]
        used = torch.cat(mine).unique()  # every edge this worker trains on, over all epochs
        corr = self.correct(batch, used, lambda rows: self._rescored(batch, rows, device)) if lag > 0 else Correction()
        metrics = [self._step(batch, adv, rows, device, corr)
                   for rows_of_epoch in mine for rows in rows_of_epoch.chunk(self.minibatches)]
        after = fingerprint(self.policy.live_state())
        self._check_changed(before, self.precision.finish(after), metrics, bool(adv.abs().sum() > 0))
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
        return out | corr.metrics

    def _rescored(self, batch: TreeBatch, rows: torch.Tensor, device):
        """(chunk, SDEStep) of `rows` under the current weights, no gradient, micro_batch at a time."""
        for chunk in rows.split(self.micro_batch) if self.micro_batch else (rows,):
            with torch.no_grad():
                yield chunk, self._rescore(batch, chunk, device)[0]

    def _check_changed(self, before, after, metrics: list[dict[str, float]], signal: bool) -> None:
        """Stop if the update could not have trained the model: advantages but no gradient at the
        optimizer's tensors, or steps that left every weight it steps as it was."""
        applied = [m for m in metrics if not m["learner/skipped"]]
        if signal and applied and all(m["learner/grad_norm"] == 0 for m in applied):
            raise UpdateChangedNothing(
                f"update {self.version + 1} had non-zero advantages but no gradient reached the optimizer's "
                f"{len(self.params)} tensors: they are not the ones the policy's forward pass uses (a wrapper or copy "
                "of its parameters), or every trainable parameter is frozen.")
        stepped = [m["learner/grad_norm"] for m in applied if m["learner/grad_norm"] > 0]
        lr = max((g["lr"] for g in self.optimizer.param_groups), default=0.0)
        if stepped and lr > 0 and not differing(before, after):
            raise UpdateChangedNothing(
                f"update {self.version + 1} took {len(stepped)} optimizer steps (grad norm up to {max(stepped):.3g}) "
                "but no weight of the policy's denoiser changed. Either the optimizer holds tensors the model does "
                f"not run (a wrapper or copy of its parameters), or learner.lr={lr:g} is below what the weights' dtype "
                f"({', '.join(self.precision.dtypes())}) can represent: train in model.dtype=float32 or raise "
                "learner.lr.")

    def _device(self) -> torch.device:
        return self.params[0].device if self.params else torch.device("cpu")

    def _step(self, batch: TreeBatch, adv: torch.Tensor, rows: torch.Tensor, device,
              corr: Correction) -> dict[str, float]:
        self.optimizer.zero_grad(set_to_none=True)
        self.precision.zero_model_grads()
        chunks = rows.split(self.micro_batch) if self.micro_batch else (rows,)
        totals: dict[str, float] = {}
        for i, chunk in enumerate(chunks):
            with sharding.no_sync(self.module, i < len(chunks) - 1):  # reduce once, after the last
                loss, m = self._loss(batch, adv, chunk, device, corr)
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
        out = self.policy.predict(latents, sigma, prompts, module=self.module, uncond_grad=self.uncond_grad)
        new = self.policy.sde_step(latents, out, sigma, sigma_next, self.noise_level, prev_sample=children,
                                   reduction=self.reduction)
        return new, (latents, children, sigma, sigma_next, prompts)

    def _loss(self, batch: TreeBatch, adv: torch.Tensor, rows: torch.Tensor, device, corr: Correction):
        new, (latents, children, sigma, sigma_next, prompts) = self._rescore(batch, rows, device, corr.shift)
        old, weights = corr.clip_against(batch, rows)  # the trees' log-probs, or decoupled PPO's proximal ones
        loss, metrics = grpo_clip_loss(new.log_prob, old.to(device), adv[rows].to(device), self.clip_eps,
                                       weights=None if weights is None else weights.to(device))
        metrics = {f"loss/{k}": v for k, v in metrics.items()}
        metrics["loss/policy"] = float(loss.detach())
        if self.kl_beta > 0:
            with torch.no_grad(), self.policy.reference():
                out_ref = self.policy.predict(latents, sigma, prompts)
            ref = self.policy.sde_step(latents, out_ref, sigma, sigma_next, self.noise_level, prev_sample=children,
                                       reduction=self.reduction)
            kl = self.kl(new, ref, sigma, sigma_next).mean()
            loss = loss + self.kl_beta * kl
            metrics["loss/kl_ref"] = float(kl.detach())
        metrics["loss/total"] = float(loss.detach())
        return loss, metrics

    def _apply_gradients(self) -> dict[str, float]:
        """Clip, check, step, or skip. Grads are already all-reduced by DDP, so every rank sees the
        same norm and takes the same decision."""
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        self.precision.grads_to_optimized()
        norm = sharding.clip_grad_norm(self.precision.optimized(), max_norm)
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
            self.precision.after_step()
            self.bad_in_a_row = 0
            self._norms = (self._norms + [norm])[-50:]
        return {"learner/grad_norm": norm if math.isfinite(norm) else -1.0, "learner/skipped": float(bad)}

    # -- checkpoint state ----------------------------------------------------------------------
    def state(self) -> dict:
        """The optimizer's state in one worker's format (index-keyed; gathered when sharded, a
        collective then), so any worker count and strategy resumes from it; float32 masters of
        low-precision weights as `masters`."""
        return {"optimizer": self.precision.optimizer_state(self.optimizer), "version": self.version,
                "bad_in_a_row": self.bad_in_a_row, "skipped_total": self.skipped_total,
                "norms": list(self._norms)} | self.precision.state()

    def load_state(self, state: dict) -> None:
        self.precision.load_optimizer_state(self.optimizer, state["optimizer"])
        self.version = int(state["version"])
        self.bad_in_a_row, self.skipped_total = int(state["bad_in_a_row"]), int(state["skipped_total"])
        self._norms = [float(x) for x in state["norms"]]
        self.precision.load_state(state)
