"""Routing an iteration's leaves from samplers to the reward pool, as each sampler call finishes.

`collect_iteration` is the only scheduling logic of the system; the scale-by-simulation
benchmark drives it with sleeping stand-in actors, so what it measures is this code."""
from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Callable

import ray
import torch
from ray.exceptions import ObjectLostError, RayActorError, RayError

from treegrpo_ray import preemption
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


@dataclass
class Reissue:
    """How to run a call again when its actor or node was lost (None: such calls are dropped, as
    before). `submit(i)` issues call i again (fresh refs, same arguments: a call is a pure function
    of its prompts, window, seed and weights, so the retry grows the same trees); `sampler_of[i]`
    is its actor; a call may wait `wait_s` for Ray to bring its actors back on a node."""
    submit: Callable[[int], list]
    sampler_of: list
    wait_s: float
    log: Callable[[str], None] = print


LOST = (RayActorError, ObjectLostError)  # an actor or an object gone with its process or node


def actor_dead(actor) -> bool:
    """True if Ray says the actor is DEAD for good (restarts used up or killed); False while it is
    alive, restarting or waiting for a node, or if its state cannot be read."""
    try:
        from ray.util.state import get_actor
        state = get_actor(actor._actor_id.hex(), timeout=10)
    except Exception:  # noqa: BLE001 - no state API (no dashboard): treat as transient
        return False
    return state is not None and state.state == "DEAD"


def collect_iteration(calls: list[list], rewards: list, chunks: int, *, started: float, timeout_s: float,
                      trees: list[int] | None = None, reissue: Reissue | None = None) -> Collected:
    """calls[i] = [info_ref, batch_ref, leaf_chunk_ref_0, ...] of sampler call i. As each call
    finishes, its leaf chunks go by reference to the least-loaded live reward actor; rewards come
    back matched to (call, chunk). The driver fetches only infos and rewards; batches stay refs.

    A call whose actor or node was lost (`LOST`: the process or node died, an object went with it)
    is run again whole once its sampler is back (`reissue`), up to `reissue.wait_s` after its first
    loss, then the run stops with what to do; a reward chunk whose reward actor was lost is scored
    again. Each retry is counted in `retried_calls` and said in the log. A call that failed in the
    code (or was lost with no `reissue`, or whose actor is dead for good) is left out with all its
    trees, counted in `dropped_trees`, never trained with part of its groups. A reward actor that
    died for good gets no more work (`dead_rewards`). If every call fails, the first error is raised."""
    calls = [list(c) for c in calls]
    infos: dict[int, object] = {}
    scores: dict[tuple[int, int], tuple] = {}
    failed: dict[int, BaseException] = {}
    waiting = {refs[0]: i for i, refs in enumerate(calls)}
    inflight: dict = {}
    due: dict[tuple[int, int], float] = {}   # (call, chunk or -1 for the whole call) -> when to retry
    lost_since: dict[int, float] = {}
    attempt = [0] * len(calls)
    load = [0] * len(rewards)
    live = list(range(len(rewards)))
    out = Collected()
    last = time.monotonic()

    def score(i: int, c: int, prompts: list[str]) -> None:
        if not live:
            failed.setdefault(i, RuntimeError("every reward actor has died"))
            return
        a = min(live, key=load.__getitem__)  # least-loaded live reward actor
        load[a] += 1
        inflight[rewards[a].score.remote(calls[i][2 + c], prompts)] = (i, c, a, attempt[i])

    def lost(i: int, c: int, e: BaseException, who: str) -> bool:
        """Schedule a retry of call i (c = -1) or of its chunk c; False if this loss is not retried."""
        if reissue is None or not isinstance(e, LOST):
            return False
        now = time.monotonic()
        first = lost_since.setdefault(i, now)
        if now - first > reissue.wait_s:
            raise NodeLost(f"{who} of sampler call {i} has been lost for {now - first:.0f} s (pools.lost_node_wait_s="
                           f"{reissue.wait_s:g}): its node is gone and no node with the pool's resources came back. "
                           f"Last error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        wait = min(10.0, 1.0 * 2 ** min(out.retried_calls, 4))
        due[(i, c)] = now + wait
        out.retried_calls += 1
        reissue.log(f"treegrpo_ray: {who} of sampler call {i} lost ({type(e).__name__}); "
                    f"{'re-scoring the chunk' if c >= 0 else 're-running the call'} in {wait:.0f} s "
                    f"(waits up to {reissue.wait_s:g} s for Ray to bring the actor back)")
        return True

    while waiting or inflight or due:
        now = time.monotonic()
        for i, c in [k for k, t in due.items() if t <= now]:
            del due[(i, c)]
            if c < 0:  # the whole call again: fresh refs, its earlier chunks' results ignored
                attempt[i] += 1
                infos.pop(i, None)
                for cc in range(chunks):
                    scores.pop((i, cc), None)
                calls[i] = list(reissue.submit(i))
                waiting[calls[i][0]] = i
            elif i in infos and i not in failed and (i, -1) not in due:
                info = infos[i]
                prompts = [info.prompts[j] for j in info.leaf_prompt.tolist()]
                lo, hi = chunk_bounds(len(prompts), chunks)[c]
                score(i, c, prompts[lo:hi])
        pending = list(waiting) + list(inflight)
        if not pending:
            time.sleep(max(0.0, min(due.values()) - time.monotonic()))
            continue
        # at most 1 s per wait: a stop signal (treegrpo_ray.preemption) abandons the sampling in flight
        wait_for = min(1.0, timeout_s, *(max(0.0, t - time.monotonic()) for t in due.values()))
        ready, _ = ray.wait(pending, num_returns=1, timeout=wait_for)
        if not ready:
            preemption.check("the iteration's sampling in flight is abandoned")
            if time.monotonic() - last >= timeout_s:
                raise TimeoutError(f"no sampler or reward result within {timeout_s} s")
            continue
        last = time.monotonic()
        ref = ready[0]
        if ref in waiting:
            i = waiting.pop(ref)
            try:
                info = infos[i] = ray.get(ref)
            except RayError as e:
                if (isinstance(e, RayActorError) and reissue and actor_dead(reissue.sampler_of[i])) \
                        or not lost(i, -1, e, "the sampler"):
                    failed[i] = e
                continue
            lost_since.pop(i, None)
            out.driver_bytes += serialized_bytes(info)
            prompts = [info.prompts[j] for j in info.leaf_prompt.tolist()]
            for c, (lo, hi) in enumerate(chunk_bounds(len(prompts), chunks)):
                score(i, c, prompts[lo:hi])
        else:
            i, c, a, tried = inflight.pop(ref)
            load[a] -= 1
            if tried != attempt[i] or i in failed:
                continue  # a chunk of an attempt that was re-run whole
            try:
                scores[(i, c)] = ray.get(ref)
            except RayError as e:
                dead = isinstance(e, RayActorError) and (reissue is None or actor_dead(rewards[a]))
                if dead and a in live:  # restarts used up: route around it
                    live.remove(a)
                    out.dead_rewards.append(a)
                if reissue is None or (dead and not live):
                    failed.setdefault(i, e)
                elif dead:  # score the chunk on another reward actor
                    due[(i, c)] = time.monotonic()
                    out.retried_calls += 1
                    reissue.log(f"treegrpo_ray: reward actor {a} is gone for good; chunk {c} of sampler call {i} "
                                "goes to another")
                elif not lost(i, -1 if isinstance(e, ObjectLostError) else c, e, "a reward chunk"):
                    failed.setdefault(i, e)  # (ObjectLostError: the leaves went with the sampler's node)
                continue
            out.driver_bytes += serialized_bytes(scores[(i, c)])
    if len(failed) == len(calls):
        first = failed[min(failed)]
        raise RuntimeError(f"every sampler call of this iteration failed; the first: {first}") from first
    _assemble(out, calls, infos, scores, failed, chunks, trees)
    out.wall_s = time.perf_counter() - started
    return out


class NodeLost(RuntimeError):
    """A lost actor did not come back within pools.lost_node_wait_s."""


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
