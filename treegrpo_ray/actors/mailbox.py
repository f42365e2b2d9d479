"""The channel between the driver and the learner's Ray Train workers: one small async actor on
the driver's node holding an inbox per rank and one outbox.

It replaced one `ray.util.queue.Queue` per inbox plus one for the outbox: each of those is an
actor of its own, a Python process that costs ~3.5 CPU-s to start (W+1 of them per run). The
semantics are a queue's: FIFO per box, a blocking `get` that waits in the actor (asyncio), and
`None` for a timed-out wait (no message is ever None).
"""
from __future__ import annotations

import asyncio

import ray

OUT = "out"


class MailboxActor:
    def __init__(self, ranks: int):
        self.ranks = ranks
        self.boxes: dict = {OUT: asyncio.Queue(), **{r: asyncio.Queue() for r in range(ranks)}}

    def to_ranks(self, item) -> None:
        for r in range(self.ranks):
            self.boxes[r].put_nowait(item)

    def clear_ranks(self) -> None:
        for r in range(self.ranks):
            while not self.boxes[r].empty():
                self.boxes[r].get_nowait()

    def put(self, box, item) -> None:
        self.boxes[box].put_nowait(item)

    async def get(self, box, timeout: float | None):
        try:
            return await asyncio.wait_for(self.boxes[box].get(), timeout)
        except asyncio.TimeoutError:
            return None


class Mailbox:
    """A handle both sides hold (it pickles into Ray Train's loop config)."""

    def __init__(self, ranks: int, actor_options: dict):
        self.actor = ray.remote(MailboxActor).options(num_cpus=0, **actor_options).remote(ranks)

    # the driver
    def to_ranks(self, item) -> None:
        """The same command to every rank, so DDP/FSDP ranks always take the same steps."""
        ray.get(self.actor.to_ranks.remote(item))

    def clear_ranks(self) -> None:
        ray.get(self.actor.clear_ranks.remote())

    def reply(self, timeout: float):
        """Rank 0's next message, or None after `timeout` seconds."""
        return ray.get(self.actor.get.remote(OUT, timeout))

    # a learner rank
    def next(self, rank: int):
        """This rank's next command (waits as long as it takes)."""
        return ray.get(self.actor.get.remote(rank, None))

    def answer(self, msg) -> None:
        ray.get(self.actor.put.remote(OUT, msg))
