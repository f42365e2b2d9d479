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
    for name, t in state.items():
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
