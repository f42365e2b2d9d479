"""How the learner's weights are stepped, chosen once when the learner is built (`precision_for`).

* `InPlace`: float32 weights, and LoRA adapters (always float32): AdamW steps the model's own
  tensors.
* `FloatMasters`: bf16/fp16 trainable weights train through float32 master copies (mixed
  precision): AdamW steps the masters and the model gets them rounded, so steps smaller than the
  weights' resolution accumulate instead of rounding away. The masters are saved with the
  checkpoint (`masters`), beside the model they round to.
* `FloatShards`: FSDP2 (learning/sharding.py): the float32 shards *are* the masters (a bf16/fp16
  `model.dtype` is only the compute dtype); the optimizer state is gathered to one worker's
  format, and with a low compute dtype the float32 weights are saved as `masters` too, so a DDP
  learner resumes from a sharded one's checkpoint and the other way round.

Each says what an update must have changed (`start` / `finish`: fingerprints of the state the
optimizer steps), moves gradients to what the optimizer steps and the result back into the model.
"""
from __future__ import annotations

import copy

import torch

from treegrpo_ray.learning import sharding
from treegrpo_ray.models.fingerprint import differing, fingerprint


class InPlace:
    """AdamW steps the model's float32 tensors themselves."""

    def __init__(self, params: list[torch.Tensor]):
        self.params = params

    def optimized(self) -> list[torch.Tensor]:
        return self.params

    def start(self, live_before: dict) -> dict:
        """Before an update: the fingerprint the update must change."""
        return live_before

    def finish(self, live_after: dict) -> dict:
        """After an update: the fingerprint to compare with `start`'s."""
        return live_after

    def grads_to_optimized(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def zero_model_grads(self) -> None:
        pass

    def dtypes(self) -> list[str]:
        return sorted({str(p.dtype).removeprefix("torch.") for p in self.optimized()})

    def optimizer_state(self, optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        optimizer.load_state_dict(copy.deepcopy(state))  # torch may alias same-device tensors

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


class FloatMasters(InPlace):
    """bf16/fp16 weights stepped through float32 masters (see the module docstring)."""

    def __init__(self, policy, params: list[torch.Tensor]):
        super().__init__(params)
        self.policy = policy
        self.masters = [p.detach().float().clone() for p in params]
        self._synced = None  # fingerprint of the live weights as the masters last wrote them

    def optimized(self) -> list[torch.Tensor]:
        return self.masters

    def start(self, live_before: dict) -> dict:
        if self._synced is None or differing(self._synced, live_before):
            self._resync()  # first update, or weights loaded since (resume, a restarted worker)
        return self._fingerprint()

    def finish(self, live_after: dict) -> dict:
        # what must change is the float32 state the optimizer steps; bf16 may round a small step away
        self._synced = live_after
        return self._fingerprint()

    def grads_to_optimized(self) -> None:
        """The model's (all-reduced) low-precision grads -> float32 on the masters."""
        for m, p in zip(self.masters, self.params):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None

    @torch.no_grad()
    def after_step(self) -> None:
        for m, p in zip(self.masters, self.params):
            p.copy_(m)  # rounded to the model's dtype

    def zero_model_grads(self) -> None:
        for p in self.params:
            p.grad = None

    def state(self) -> dict:
        return {"masters": [m.detach().cpu().clone() for m in self.masters]}

    def load_state(self, state: dict) -> None:
        """The float32 weights saved with the model they round to; a checkpoint without them (a
        float32 run's) starts the masters from the loaded model."""
        if "masters" in state and len(state["masters"]) == len(self.masters):
            with torch.no_grad():
                for m, saved in zip(self.masters, state["masters"]):
                    m.copy_(saved)
            self._synced = fingerprint(self.policy.live_state())
        else:
            self._resync()

    def _fingerprint(self) -> dict:
        return fingerprint({str(i): m for i, m in enumerate(self.masters)})

    @torch.no_grad()
    def _resync(self) -> None:
        for m, p in zip(self.masters, self.params):
            m.copy_(p.float())
        self._synced = fingerprint(self.policy.live_state())


class FloatShards(InPlace):
    """FSDP2's float32 shards, computing in `policy.dtype` (see the module docstring)."""

    def __init__(self, policy, module, params: list[torch.Tensor], rank: int):
        super().__init__(params)
        self.policy, self.module, self.rank = policy, module, rank

    def optimizer_state(self, optimizer) -> dict:
        """Gathered to the index-keyed format of one worker (a collective)."""
        return sharding.full_optimizer_state(self.module, optimizer, self.policy.trainable_names())

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        sharding.load_full_optimizer_state(self.module, optimizer, state, self.policy.trainable_names())

    def state(self) -> dict:
        if self.policy.dtype == torch.float32:
            return {}
        masters = []
        for p in self.params:  # gathered one at a time on every rank; rank 0 keeps them
            whole = p.full_tensor().detach()
            if self.rank == 0:
                masters.append(whole.cpu())
        return {"masters": masters} if self.rank == 0 else {}

    def load_state(self, state: dict) -> None:
        if "masters" in state:  # float32 weights saved beside a bf16 model: the shards' own
            sharding.load_full_state(self.module, dict(zip(self.policy.trainable_names(), state["masters"])),
                                     strict=False)


def precision_for(policy, module, params: list[torch.Tensor], rank: int = 0) -> InPlace:
    """The one way this learner's weights are stepped (see the module docstring)."""
    if sharding.is_sharded(module):
        return FloatShards(policy, module, params, rank)
    if any(p.dtype != torch.float32 for p in params):
        return FloatMasters(policy, params)
    return InPlace(params)
