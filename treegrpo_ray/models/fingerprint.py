"""Weight fingerprints: proof that published weights arrived in the module that runs.

The silent failure of weight sync is a load that binds nothing (verl-omni #552: a LoRA sync
matched zero modules, the samplers kept the old weights, the reward stayed flat). So the
learner's rank 0 fingerprints every state it publishes, and each sampler recomputes the
fingerprint from its live parameters after loading and stops the run on any difference.

A fingerprint is, per tensor, up to `SAMPLES` elements at evenly spaced flat positions, as
float32 (exact for fp32/bf16/fp16). Gathering them costs microseconds per tensor on any
device, and the values are bit copies, so the sampler's comparison is exact: no tolerance,
whatever device or reduction order. It is a sample, not a hash of every byte: it catches a
load that binds nothing or the wrong tensors, a dtype or packing error, a stale version, but
not a corruption confined to unsampled elements.

Sharded tensors (FSDP2's DTensors, dim 0 split over the ranks) are sampled where they lie: each
rank reads the sampled positions in its own rows and one all-gather of the samples assembles them,
so the fingerprint of a sharded model equals that of the same model whole (a collective: every
rank fingerprints the same tensors in the same order).
"""
from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

SAMPLES = 256

Fingerprint = dict[str, torch.Tensor]


class WeightSyncError(RuntimeError):
    """Loaded weights differ from what the learner published."""


def positions(numel: int, samples: int = SAMPLES) -> torch.Tensor:
    """Flat indices of the sampled elements: first, last and evenly spaced between."""
    if numel <= samples:
        return torch.arange(numel)
    return torch.linspace(0, numel - 1, samples, dtype=torch.float64).round().long()


@torch.no_grad()
def fingerprint(state: Mapping[str, torch.Tensor]) -> Fingerprint:
    """{name: sampled values (float32, CPU)} of each tensor in `state`."""
    by_device: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    sharded = {name: t for name, t in state.items() if _is_dtensor(t)}
    if sharded:
        by_device[torch.device("cpu")] = list(_sharded_samples(sharded).items())
    for name, t in state.items():
        if name in sharded:
            continue
        flat = t.detach().reshape(-1)
        by_device.setdefault(flat.device, []).append((name, flat[positions(flat.numel()).to(flat.device)].float()))
    out = {}
    for parts in by_device.values():  # one device -> host copy per device, not one per tensor
        values = torch.cat([v for _, v in parts]).cpu().split([v.numel() for _, v in parts])
        # clone: a split is a view of the whole concatenation, and pickling a view sends its whole
        # storage (each of 179 tensors carried all 4.5 M samples: a 25 MB fingerprint per publish
        # and per sampler call for 8 MB of weights, BENCHMARKS.md §14)
        out.update({name: v.clone() for (name, _), v in zip(parts, values)})
    return {name: out[name] for name in state}


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _sharded_samples(state: dict) -> dict[str, torch.Tensor]:
    """The samples of DTensors sharded on dim 0 over a 1-D mesh (FSDP2), by one all-gather."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard
    values, owned, spans = [], [], []
    for name, t in state.items():
        if t.device_mesh.ndim != 1 or tuple(t.placements) != (Shard(0),) or t.ndim == 0:
            raise ValueError(f"fingerprint: {name} is sharded as {t.placements} over a {t.device_mesh.ndim}-D mesh; "
                             "only FSDP2's dim-0 sharding over one mesh dimension is supported")
        mesh, rows = t.device_mesh, t.shape[0]
        local = t.to_local().detach().reshape(-1)
        per_row = t.numel() // rows if rows else 0
        chunk = -(-rows // mesh.size())  # torch.chunk's rows per rank, as DTensor's Shard(0) splits
        start = min(mesh.get_local_rank() * chunk, rows) * per_row
        pos = positions(t.numel())
        mine = (pos >= start) & (pos < start + local.numel())
        v = torch.zeros(pos.numel(), dtype=torch.float32, device=local.device)
        v[mine.to(local.device)] = local[(pos[mine] - start).to(local.device)].float()
        values.append(v)
        owned.append(mine.float().to(local.device))
        spans.append((name, pos.numel()))
    mine = torch.stack([torch.cat(values), torch.cat(owned)])  # (2, samples)
    group = next(iter(state.values())).device_mesh.get_group()
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    out = torch.zeros(mine.shape[1])
    for g in gathered:  # each sample is owned by exactly one rank: copy its value (bits unchanged)
        g = g.cpu()
        out = torch.where(g[1] > 0, g[0], out)
    return dict(zip([n for n, _ in spans], out.split([k for _, k in spans])))


def digest(fp: Fingerprint) -> str:
    """12 hex digits naming a fingerprint in logs."""
    h = hashlib.blake2b(digest_size=6)
    for name in sorted(fp):
        h.update(name.encode())
        h.update(fp[name].numpy().tobytes())
    return h.hexdigest()


def differing(expected: Fingerprint, got: Fingerprint) -> list[str]:
    """Names whose samples differ (bitwise; NaNs compare equal to NaNs), or that one side lacks."""
    names = sorted(set(expected) | set(got))
    return [n for n in names if n not in expected or n not in got or expected[n].shape != got[n].shape
            or not torch.equal(expected[n].view(torch.int32), got[n].view(torch.int32))]


def verify(expected: Fingerprint, got: Fingerprint, *, version: int, where: str) -> None:
    """Raise WeightSyncError naming the tensors if `got` is not `expected`."""
    bad = differing(expected, got)
    if bad:
        raise WeightSyncError(
            f"weights version {version} did not arrive in {where}: {len(bad)} of {len(expected)} tensors differ "
            f"from what the learner published ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; "
            f"published {digest(expected)}, loaded {digest(got)}). The sampler would have kept generating with "
            "other weights than the learner trains. Check that the sampler's policy is built like the learner's "
            "(model.pretrained, model.lora_rank, model.dtype) and that nothing wraps or copies its modules.")
