"""Routing an iteration's leaves from samplers to the reward pool, as each sampler call finishes.

`collect_iteration` is the only scheduling logic of the system; the scale-by-simulation
benchmark drives it with sleeping stand-in actors, so what it measures is this code."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import ray
import torch
from ray.exceptions import ObjectLostError, RayActorError, RayError

from treegrpo_ray import preemption
from treegrpo_ray.system import Collected, ScoreReply


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """The same split torch.tensor_split makes of n rows into `chunks` parts."""
    q, r = divmod(n, chunks)
    bounds, lo = [], 0
    for c in range(chunks):
        hi = lo + q + (1 if c < r else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


@dataclass
class SampleCall:
    """The refs of one sampler call (`SamplerActor.sample`, num_returns = 2 + chunks), each for
    its own reader: the BatchInfo the driver fetches, the batch the learner fetches, and the leaf
    chunks the reward pool fetches."""
    info: ray.ObjectRef
    batch: ray.ObjectRef
    leaf_chunks: list

    @classmethod
    def of(cls, refs) -> "SampleCall":
        refs = list(refs)
        return cls(refs[0], refs[1], refs[2:])


@dataclass
class Reissue:
    """How to run a call again when its actor or node was lost (None: such calls are dropped, as
    before). `submit(i)` issues call i again (a fresh SampleCall, same arguments: a call is a pure function
    of its prompts, window, seed and weights, so the retry grows the same trees); `sampler_of[i]`
    is its actor; a call may wait `wait_s` for Ray to bring its actors back on a node."""
    submit: Callable[[int], SampleCall]
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


def collect_iteration(calls: list[SampleCall], rewards: list, chunks: int, *, started: float, timeout_s: float,
                      trees: list[int] | None = None, reissue: Reissue | None = None) -> Collected:
    """calls[i]: the refs of sampler call i. As each call
    finishes, its leaf chunks go by reference to the least-loaded live reward actor; rewards come
    back matched to (call, chunk). The driver fetches only infos and rewards; batches stay refs.

    A call whose actor or node was lost (`LOST`: the process or node died, an object went with it)
    is run again whole once its sampler is back (`reissue`), up to `reissue.wait_s` after its first
    loss, then the run stops with what to do; a reward chunk whose reward actor was lost is scored
    again. Each retry is counted in `retried_calls` and said in the log. A call that failed in the
    code (or was lost with no `reissue`, or whose actor is dead for good) is left out with all its
    trees, counted in `dropped_trees`, never trained with part of its groups. A reward actor that
    died for good gets no more work (`dead_rewards`). If every call fails, the first error is raised."""
    it = _Iteration(calls, rewards, chunks, reissue)
    last = time.monotonic()
    while it.waiting or it.inflight or it.due:
        preemption.check("the iteration's sampling in flight is abandoned")  # a stop signal: see below
        it.reissue_due()
        pending = list(it.waiting) + list(it.inflight)
        if not pending:
            time.sleep(max(0.0, min(it.due.values()) - time.monotonic()))
            continue
        # at most 1 s per wait: a stop signal (treegrpo_ray.preemption) abandons the sampling in flight
        wait_for = min(1.0, timeout_s, *(max(0.0, t - time.monotonic()) for t in it.due.values()))
        ready, _ = ray.wait(pending, num_returns=1, timeout=wait_for)
        if not ready:
            if time.monotonic() - last >= timeout_s:
                raise TimeoutError(f"no sampler or reward result within {timeout_s} s")
            continue
        last = time.monotonic()
        it.sampled(ready[0]) if ready[0] in it.waiting else it.scored(ready[0])
    if len(it.failed) == len(calls):
        first = it.failed[min(it.failed)]
        raise RuntimeError(f"every sampler call of this iteration failed; the first: {first}") from first
    _assemble(it.out, it.calls, it.infos, it.scores, it.failed, chunks, trees)
    it.out.wall_s = time.perf_counter() - started
    return it.out


class _Iteration:
    """The state of one iteration's collection: calls waiting on samplers, chunks in flight on
    reward actors, retries due, results and failures."""

    def __init__(self, calls: list[SampleCall], rewards: list, chunks: int, reissue: Reissue | None):
        self.calls, self.rewards, self.chunks, self.reissue = list(calls), rewards, chunks, reissue
        self.infos: dict[int, object] = {}
        self.scores: dict[tuple[int, int], ScoreReply] = {}
        self.failed: dict[int, BaseException] = {}
        self.waiting = {call.info: i for i, call in enumerate(self.calls)}
        self.inflight: dict = {}                   # score ref -> (call, chunk, reward actor, attempt)
        self.due: dict[tuple[int, int], float] = {}  # (call, chunk or -1 for the whole call) -> retry time
        self.lost_since: dict[int, float] = {}
        self.attempt = [0] * len(self.calls)
        self.load = [0] * len(rewards)
        self.live = list(range(len(rewards)))
        self.out = Collected()

    def score(self, i: int, c: int) -> None:
        """Send chunk c of call i to the least-loaded live reward actor."""
        if not self.live:
            self.failed.setdefault(i, RuntimeError("every reward actor has died"))
            return
        info = self.infos[i]
        prompts = [info.prompts[j] for j in info.leaf_prompt.tolist()]
        lo, hi = chunk_bounds(len(prompts), self.chunks)[c]
        a = min(self.live, key=self.load.__getitem__)
        self.load[a] += 1
        self.inflight[self.rewards[a].score.remote(self.calls[i].leaf_chunks[c], prompts[lo:hi])] = (i, c, a, self.attempt[i])

    def sampled(self, ref) -> None:
        i = self.waiting.pop(ref)
        try:
            info = self.infos[i] = ray.get(ref)
        except RayError as e:
            dead = isinstance(e, RayActorError) and self.reissue and actor_dead(self.reissue.sampler_of[i])
            if dead or not self.lost(i, -1, e, "the sampler"):
                self.failed[i] = e
            return
        self.lost_since.pop(i, None)
        self.out.driver_bytes += info.payload_bytes
        for c in range(self.chunks):
            self.score(i, c)

    def scored(self, ref) -> None:
        i, c, a, tried = self.inflight.pop(ref)
        self.load[a] -= 1
        if tried != self.attempt[i] or i in self.failed:
            return  # a chunk of an attempt that was re-run whole
        try:
            self.scores[(i, c)] = ray.get(ref)
        except RayError as e:
            dead = isinstance(e, RayActorError) and (self.reissue is None or actor_dead(self.rewards[a]))
            if dead and a in self.live:  # restarts used up: route around it
                self.live.remove(a)
                self.out.dead_rewards.append(a)
            if self.reissue is None or (dead and not self.live):
                self.failed.setdefault(i, e)
            elif dead:  # score the chunk on another reward actor
                self.due[(i, c)] = time.monotonic()
                self.out.retried_calls += 1
                self.reissue.log(f"treegrpo_ray: reward actor {a} is gone for good; chunk {c} of sampler call {i} "
                                 "goes to another")
            elif not self.lost(i, -1 if isinstance(e, ObjectLostError) else c, e, "a reward chunk"):
                self.failed.setdefault(i, e)  # (ObjectLostError: the leaves went with the sampler's node)
            return
        self.out.driver_bytes += self.scores[(i, c)].payload_bytes

    def lost(self, i: int, c: int, e: BaseException, who: str) -> bool:
        """Schedule a retry of call i (c = -1) or of its chunk c; False if this loss is not retried."""
        if self.reissue is None or not isinstance(e, LOST):
            return False
        now = time.monotonic()
        first = self.lost_since.setdefault(i, now)
        if now - first > self.reissue.wait_s:
            raise NodeLost(f"{who} of sampler call {i} has been lost for {now - first:.0f} s (pools.lost_node_wait_s="
                           f"{self.reissue.wait_s:g}): its node is gone and no node with the pool's resources came "
                           f"back. Last error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        wait = min(10.0, 1.0 * 2 ** min(self.out.retried_calls, 4))
        self.due[(i, c)] = now + wait
        self.out.retried_calls += 1
        self.reissue.log(f"treegrpo_ray: {who} of sampler call {i} lost ({type(e).__name__}); "
                         f"{'re-scoring the chunk' if c >= 0 else 're-running the call'} in {wait:.0f} s "
                         f"(waits up to {self.reissue.wait_s:g} s for Ray to bring the actor back)")
        return True

    def reissue_due(self) -> None:
        """Run again what is due: a whole call (fresh refs; its earlier chunks' results ignored) or a chunk."""
        now = time.monotonic()
        for i, c in [k for k, t in self.due.items() if t <= now]:
            del self.due[(i, c)]
            if c < 0:
                self.attempt[i] += 1
                self.infos.pop(i, None)
                for cc in range(self.chunks):
                    self.scores.pop((i, cc), None)
                self.calls[i] = self.reissue.submit(i)
                self.waiting[self.calls[i].info] = i
            elif i in self.infos and i not in self.failed and (i, -1) not in self.due:
                self.score(i, c)


class NodeLost(RuntimeError):
    """A lost actor did not come back within pools.lost_node_wait_s."""


def _assemble(out: Collected, calls: list[SampleCall], infos: dict, scores: dict[tuple[int, int], ScoreReply],
              failed: dict, chunks: int, trees: list[int] | None) -> None:
    """The calls that succeeded, in call order, each with its chunks' rewards concatenated; the
    failed ones counted in dropped_trees."""
    for i in range(len(calls)):
        if i in failed:
            out.dropped_trees += infos[i].trees if i in infos else (trees[i] if trees else 0)
            continue
        parts = [scores[(i, c)] for c in range(chunks)]
        merged = {n: torch.cat([p.rewards[n] for p in parts]) for n in parts[0].rewards}
        info, call = infos[i], infos[i].call
        out.add(calls[i].batch, info, merged, sample_s=call.sample_s if call else 0.0,
                reward_s=sum(p.busy_s for p in parts), reward_parts=[p.seconds for p in parts])
        out.restarts += int(bool(call and call.restarted)) + sum(int(p.restarted) for p in parts)
