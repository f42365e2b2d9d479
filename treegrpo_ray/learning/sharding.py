"""FSDP2 for the learner (`learner.strategy=fsdp`): the denoiser's parameters sharded over the
learner workers with `torch.distributed.fsdp.fully_shard`, and the few places where the learner
must see whole tensors.

* `shard_denoiser`: `fully_shard` on each transformer block (the classes the model names in
  diffusers' `_no_split_modules`), then on the root, over a 1-D device mesh of the workers
  (passed explicitly: gloo on CPU, NCCL on GPUs). The sharded parameters are float32 and are the
  optimizer's master weights; a bf16/fp16 `model.dtype` is the compute dtype of a
  `MixedPrecisionPolicy` (gradients reduced in float32), so no second set of masters exists.
* `no_sync`: skip the gradient reduction of all but the last micro-batch (DDP's `no_sync`,
  FSDP2's `set_requires_gradient_sync`).
* `clip_grad_norm`: the global norm over sharded gradients (each rank holds a shard of each).
* whole tensors come out one at a time (`DiffusionPolicy.broadcast_tensors`: `full_tensor`, a
  collective every rank calls in the same order), so publishing, checkpointing and export never
  hold more than one whole tensor beyond what they write out.
* `load_full_state` / optimizer state in and out: checkpoints hold the gathered full state, the
  same files a DDP or single-worker learner writes (see train_loop), so a run resumes with another
  worker count or strategy.

LoRA with FSDP is refused at config load (config.py says why).
"""
from __future__ import annotations

import contextlib
import torch
import torch.distributed as dist


def shard_denoiser(denoiser: torch.nn.Module, *, device_type: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Shard `denoiser` in place over all ranks of the default process group; returns it (now an
    FSDPModule). Its parameters become float32 DTensors; forward runs in `compute_dtype`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    denoiser.float()  # the shards are the float32 masters
    low = compute_dtype != torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype if low else None,
                              reduce_dtype=torch.float32 if low else None)
    blocks = tuple(getattr(denoiser, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} names no transformer blocks (_no_split_modules): "
                         "learner.strategy=fsdp cannot tell where to shard it; use learner.strategy=ddp")
    for module in list(denoiser.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=mp)
    fully_shard(denoiser, mesh=mesh, mp_policy=mp)
    return denoiser


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


@contextlib.contextmanager
def no_sync(module, enabled: bool = True):
    """Accumulate gradients locally (no all-reduce / reduce-scatter) inside the block."""
    if not enabled:
        yield
    elif is_sharded(module):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for plain or sharded (DTensor) gradients: the norm of the
    whole gradient, the same on every rank."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)


@torch.no_grad()
def load_full_state(module: torch.nn.Module, state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy a full (unsharded) state into a sharded module: each rank keeps its own rows."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(module, {k: v.float() for k, v in state.items()},
                         options=StateDictOptions(full_state_dict=True, strict=strict))


def full_optimizer_state(module, optimizer, names: list[str]) -> dict:
    """The optimizer's gathered state keyed by parameter index in `names` order: the format of
    `optimizer.state_dict()` on one unsharded worker (a collective; rank 0 gets it, the others {})."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    by_name = get_optimizer_state_dict(module, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    if not by_name:  # cpu_offload gathers to rank 0 only
        return {}
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def load_full_optimizer_state(module, optimizer, state: dict, names: list[str]) -> None:
    """Inverse of `full_optimizer_state`: an index-keyed full state (from any worker count) in."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    by_name = {"state": {names[i]: s for i, s in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(module, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
