"""Routing an iteration's leaves from samplers to the reward pool, as each sampler call finishes.

`collect_iteration` is the only scheduling logic of the system; the scale-by-simulation
benchmark drives it with sleeping stand-in actors, so what it measures is this code."""
from __future__ import annotations

import pickle
import time

import ray
import torch
from ray.exceptions import RayActorError, RayError

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


def serialized_bytes(obj) -> int:
    """What fetching `obj` moved into the driver (its pickle; tensors and arrays by their buffers)."""
    return len(pickle.dumps(obj, protocol=5))


def collect_iteration(calls: list[list], rewards: list, chunks: int, *, started: float, timeout_s: float,
                      trees: list[int] | None = None) -> Collected:
    """calls[i] = [info_ref, batch_ref, leaf_chunk_ref_0, ...] of sampler call i. As each call
    finishes, its leaf chunks go by reference to the least-loaded live reward actor; rewards come
    back matched to (call, chunk). The driver fetches only infos and rewards; batches stay refs.

    Whole calls are the unit of failure: a call whose sampling or any reward chunk failed (after
    Ray's own retries) is left out with all its trees, counted in `dropped_trees` (trees[i], or
    the call's info when known), never trained with part of its groups. A reward actor that died
    for good gets no more work (`dead_rewards`). If every call fails, the first error is raised."""
    infos: dict[int, object] = {}
    scores: dict[tuple[int, int], tuple] = {}
    failed: dict[int, BaseException] = {}
    waiting = {refs[0]: i for i, refs in enumerate(calls)}
    inflight: dict = {}
    load = [0] * len(rewards)
    live = list(range(len(rewards)))
    out = Collected()
    while waiting or inflight:
        ready, _ = ray.wait(list(waiting) + list(inflight), num_returns=1, timeout=timeout_s)
        if not ready:
            raise TimeoutError(f"no sampler or reward result within {timeout_s} s")
        ref = ready[0]
        if ref in waiting:
            i = waiting.pop(ref)
            try:
                info = infos[i] = ray.get(ref)
            except RayError as e:
                failed[i] = e
                continue
            out.driver_bytes += serialized_bytes(info)
            prompts = [info.prompts[j] for j in info.leaf_prompt.tolist()]
            for c, (lo, hi) in enumerate(chunk_bounds(len(prompts), chunks)):
                if not live:
                    failed.setdefault(i, RuntimeError("every reward actor has died"))
                    break
                a = min(live, key=load.__getitem__)  # least-loaded live reward actor
                load[a] += 1
                inflight[rewards[a].score.remote(calls[i][2 + c], prompts[lo:hi])] = (i, c, a)
        else:
            i, c, a = inflight.pop(ref)
            load[a] -= 1
            try:
                scores[(i, c)] = ray.get(ref)
            except RayError as e:
                failed.setdefault(i, e)
                if isinstance(e, RayActorError) and a in live:  # restarts used up: route around it
                    live.remove(a)
                    out.dead_rewards.append(a)
                continue
            out.driver_bytes += serialized_bytes(scores[(i, c)])
    if len(failed) == len(calls):
        first = failed[min(failed)]
        raise RuntimeError(f"every sampler call of this iteration failed; the first: {first}") from first
    _assemble(out, calls, infos, scores, failed, chunks, trees)
    out.wall_s = time.perf_counter() - started
    return out


def _assemble(out: Collected, calls: list[list], infos: dict, scores: dict, failed: dict, chunks: int,
              trees: list[int] | None) -> None:
    """The calls that succeeded, in call order, each with its chunks' rewards concatenated; the
    failed ones counted in dropped_trees."""
    for i in range(len(calls)):
        if i in failed:
            out.dropped_trees += infos[i].trees if i in infos else (trees[i] if trees else 0)
            continue
        parts = [scores[(i, c)] for c in range(chunks)]
        merged = {n: torch.cat([p[0][n] for p in parts]) for n in parts[0][0]}
        info = infos[i]
        out.add(calls[i][1], info, merged, sample_s=info.extras.get("sample_s", 0.0),
                reward_s=sum(p[1] for p in parts), reward_parts=[p[4] for p in parts])
        out.restarts += int(info.extras.get("reconstructed", 0.0)) + sum(int(p[2]) for p in parts)
