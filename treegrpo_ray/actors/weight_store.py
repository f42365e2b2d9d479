"""Versioned weights in the object store, published in buckets.

The learner's rank 0 streams the broadcast tensors (`publish`: one whole tensor at a time, a
sharded learner gathering each from its shards) into buckets of about BUCKET_BYTES, `ray.put`s
each bucket and hands the store only the buckets' refs, the version and the fingerprint; samplers
fetch a version bucket by bucket (`load`), copying each into their live parameters before mapping
the next. No process holds a whole second copy in its own memory (BENCHMARKS.md §15 measures the path).

The store re-puts each bucket as it arrives, so it owns the published version (since Ray 2.56 a
worker cannot hand ownership of its `ray.put` to another actor): the version outlives a learner
worker or node lost right after publishing, which samplers may still be loading. That costs a
second object-store copy of each bucket while the publish runs (the rank-0-owned variant without
it left samplers waiting on a lost version: BENCHMARKS.md §15). A sampler that finds a version's
buckets lost all the same waits for a newer one (SamplerActor._load). Each version carries the publisher's fingerprint
(treegrpo_ray.models.fingerprint), which samplers check their loaded weights against."""
from __future__ import annotations

import warnings

import numpy as np
import ray
import torch


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, tuple[np.ndarray, str]]:
    """Torch state -> numpy arrays (bf16/fp16 as same-width integer views). Ray hands numpy out
    zero-copy and read-only; its default torch path copies on every get at ~0.6 GB/s
    (BENCHMARKS.md §4: 1 GB fetch 1.9 s as torch, 0.28 s as numpy)."""
    packed = {}
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):
            packed[k] = (t.view(torch.int16).numpy(), str(t.dtype))
        else:
            packed[k] = (t.numpy(), str(t.dtype))
    return packed


BUCKET_BYTES = 256 * 2 ** 20


def publish(store, version: int, tensors, *, bucket_bytes: int = BUCKET_BYTES) -> int:
    """Put (name, tensor) pairs into the object store in buckets and publish them as `version`;
    returns the bytes published. A CPU tensor is not copied before `ray.put` copies it into the
    object store (which does so before returning, so training may change it afterwards)."""
    from treegrpo_ray.models.fingerprint import fingerprint
    refs, bucket, fp, size, total = [], {}, {}, 0, 0
    for name, t in tensors:
        t = t.detach().to("cpu").contiguous()
        fp.update(fingerprint({name: t}))
        bucket.update(pack_state({name: t}))
        size += t.numel() * t.element_size()
        if size >= bucket_bytes:
            refs.append(ray.put(bucket))
            bucket, total, size = {}, total + size, 0
    if bucket or not refs:
        refs.append(ray.put(bucket))
    ray.get(store.publish.remote(version, refs, fp))  # a list: its refs travel unresolved
    return total + size


def buckets(refs: list):
    """The unpacked buckets of a published version, one at a time (each mapped only while read)."""
    for ref in refs:
        yield unpack_state(ray.get(ref))


def unpack_state(packed: dict[str, tuple[np.ndarray, str]]) -> dict[str, torch.Tensor]:
    """Inverse of pack_state. The tensors alias read-only object-store memory: callers copy them
    into their own parameters (load_broadcast_state does) and never write to them."""
    out = {}
    with warnings.catch_warnings():  # torch warns that the array is not writable; we only read it
        warnings.simplefilter("ignore")
        for k, (a, dtype) in packed.items():
            t = torch.from_numpy(a)
            out[k] = t.view(getattr(torch, dtype.removeprefix("torch."))) if dtype in ("torch.bfloat16", "torch.float16") else t
    return out


def reconstructed() -> bool:
    """True in an actor that Ray restarted after a crash (its first life had the same id); False
    outside actors (an actor class used in-process, as tests do)."""
    if ray.get_runtime_context().get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # Ray 2.60's own property trips its deprecated actor_id path
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self):
        self.version = -1
        self.refs = None
        self.fingerprint = None

    def publish(self, version: int, refs: list, fingerprint: dict | None = None) -> int:
        """Record `version` as the buckets `refs` (the same version again: a republish after the
        learner was restored). The previous version's buckets are released."""
        if version < self.version:
            raise ValueError(f"weights version went backwards: {version} after {self.version}")
        # re-put bucket by bucket so the store owns them: the learner's rank 0, which put them, may be
        # lost with its node while samplers still need this version (a get here maps the bucket, no
        # heap copy; the publisher's objects are freed when it returns)
        owned = [ray.put(ray.get(r)) for r in refs]
        self.version, self.refs, self.fingerprint = version, owned, fingerprint
        return version

    def latest(self, have_version: int = -1):
        """None if the caller is up to date, else (version, [bucket refs], fingerprint) (in a list,
        the refs travel unresolved)."""
        if self.refs is None or self.version <= have_version:
            return None
        return self.version, self.refs, self.fingerprint

    def current_version(self) -> int:
        return self.version

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()
