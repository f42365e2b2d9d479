"""Which pool limits an iteration? A pure function over measured busy times (no Ray import): the
driver prints it at the end of a Ray run (over all its iterations) and the scale-by-simulation
benchmark prints it per layout.

Model: an iteration is a pipeline of pools (samplers -> rewards -> learner). Pool p with n_p
actors and summed busy seconds b_p needs at least `stage_s = b_p / n_p` of the iteration's wall
time if its work were spread perfectly. The pool with the largest stage time is the bottleneck.
If the stages together explain less than half of the wall time, no pool is the limit: the time
goes to the driver, Ray and transfers ("overhead"). Samplers are the pool that *should* be the
limit (they do the expensive denoising); for every other pool the diagnosis says how many actors
would bring its stage down to `target` x the sampler stage, which is what keeps samplers busy
when stages do not overlap (the synchronous, on-policy iteration).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

OVERHEAD = "overhead"


@dataclass(frozen=True)
class Diagnosis:
    bottleneck: str                 # pool name with the largest stage time, or "overhead"
    stage_s: dict[str, float]       # busy_s / actors per pool: the pool's share of the wall time
    utilisation: dict[str, float]   # stage_s / wall_s per pool (1.0 = busy the whole iteration)
    sampler_idle: float             # 1 - utilisation of the sampler pool
    overhead_s: float               # wall_s - sum(stage_s), floored at 0: time no pool explains
    suggest: dict[str, int]         # pool -> actor count that brings its stage to target x sampler stage

    def summary(self) -> str:
        parts = [f"bottleneck={self.bottleneck}", f"sampler_idle={self.sampler_idle:.0%}"]
        parts += [f"{p}->{n}" for p, n in self.suggest.items()]
        return " ".join(parts)


def diagnose(busy_s: dict[str, float], actors: dict[str, int], wall_s: float, *, sampler: str = "sampler",
             target: float = 0.1) -> Diagnosis:
    """busy_s[p]: summed busy seconds of pool p's actors in one iteration (or a window of them);
    actors[p]: pool size; wall_s: the iteration's wall time. `target`: the largest stage time a
    non-sampler pool may take, as a fraction of the sampler stage, before a bigger pool is suggested."""
    if set(busy_s) != set(actors) or sampler not in busy_s:
        raise ValueError(f"busy_s {sorted(busy_s)} and actors {sorted(actors)} must name the same pools, "
                         f"including {sampler!r}")
    if wall_s <= 0 or any(n < 1 for n in actors.values()) or any(b < 0 for b in busy_s.values()):
        raise ValueError("wall_s must be > 0, pool sizes >= 1 and busy times >= 0")
    stage = {p: busy_s[p] / actors[p] for p in busy_s}
    util = {p: s / wall_s for p, s in stage.items()}
    explained = sum(stage.values())
    bottleneck = max(stage, key=stage.__getitem__) if explained >= 0.5 * wall_s else OVERHEAD
    limit = target * stage[sampler]
    suggest = {p: max(actors[p], math.ceil(busy_s[p] / limit - 1e-9)) for p in busy_s
               if p != sampler and limit > 0 and stage[p] > limit}
    return Diagnosis(bottleneck=bottleneck, stage_s=stage, utilisation=util, sampler_idle=max(0.0, 1.0 - util[sampler]),
                     overhead_s=max(0.0, wall_s - explained), suggest=suggest)
