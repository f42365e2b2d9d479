"""Versioned weights in the object store. The learner's rank 0 sends each new state here once;
the store re-puts it (so the object outlives the learner worker that produced it: since Ray 2.56
a worker cannot hand ownership of its own `ray.put` to another actor) and samplers fetch the
newest version by reference: one put, N gets."""
from __future__ import annotations

import warnings

import ray


def reconstructed() -> bool:
    """True in an actor that Ray restarted after a crash (its first life had the same id)."""
    with warnings.catch_warnings():  # Ray 2.60's own property trips its deprecated actor_id path
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


@ray.remote(num_cpus=0)
class WeightStore:
    def __init__(self):
        self.version = -1
        self.ref = None

    def publish(self, version: int, state: dict) -> int:
        if version < self.version:
            raise ValueError(f"weights version went backwards: {version} after {self.version}")
        self.version, self.ref = version, ray.put(state)  # the previous version's object is released
        return version

    def latest(self, have_version: int = -1):
        """None if the caller is up to date, else (version, [ref]) (the list keeps the ref unresolved)."""
        if self.ref is None or self.version <= have_version:
            return None
        return self.version, [self.ref]

    def current_version(self) -> int:
        return self.version
