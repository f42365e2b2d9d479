"""Routing an iteration's leaves from samplers to the reward pool, as each sampler finishes.

`collect_iteration` is the only scheduling logic of the system; the scale-by-simulation
benchmark drives it with sleeping stand-in actors, so what it measures is this code."""
from __future__ import annotations

import time

import ray
import torch

from treegrpo_ray.system import Collected


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """The same split torch.tensor_split makes of n rows into `chunks` parts."""
    q, r = divmod(n, chunks)
    bounds, lo = [], 0
    for c in range(chunks):
        hi = lo + q + (1 if c < r else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def collect_iteration(calls: list[list], rewards: list, chunks: int, *, started: float, timeout_s: float) -> Collected:
    """calls[i] = [batch_ref, leaf_chunk_ref_0, ...] of sampler call i. Each finished sampler's
    leaf chunks go by reference to the least-loaded reward actor; results come back matched to
    (call, chunk). Returns batches and rewards in call order."""
    batches: dict[int, object] = {}
    scores: dict[tuple[int, int], tuple] = {}
    waiting = {refs[0]: i for i, refs in enumerate(calls)}
    inflight: dict = {}
    load = [0] * len(rewards)
    while waiting or inflight:
        ready, _ = ray.wait(list(waiting) + list(inflight), num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no sampler or reward result within {timeout_s} s")
        ref = ready[0]
        if ref in waiting:
            i = waiting.pop(ref)
            batch = batches[i] = ray.get(ref)
            prompts = [batch.prompts[j] for j in batch.leaf_prompt.tolist()]
            for c, (lo, hi) in enumerate(chunk_bounds(len(prompts), chunks)):
                a = min(range(len(rewards)), key=load.__getitem__)  # least-loaded reward actor
                load[a] += 1
                inflight[rewards[a].score.remote(calls[i][1 + c], prompts[lo:hi])] = (i, c, a)
        else:
            i, c, a = inflight.pop(ref)
            load[a] -= 1
            scores[(i, c)] = ray.get(ref)
    out = Collected()
    for i in range(len(calls)):
        parts = [scores[(i, c)] for c in range(chunks)]
        merged = {n: torch.cat([p[0][n] for p in parts]) for n in parts[0][0]}
        batch = batches[i]
        out.add(batch, merged, sample_s=batch.extras.get("sample_s", 0.0), reward_s=sum(p[1] for p in parts),
                reward_parts=[p[4] for p in parts])
        out.restarts += int(batch.extras.get("reconstructed", 0.0)) + sum(int(p[2]) for p in parts)
    out.wall_s = time.perf_counter() - started
    return out
