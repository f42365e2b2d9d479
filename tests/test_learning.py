"""The default run learns, and what it learns carries to prompts it never trains on: TreeGRPO
raises the miniature reward on the training prompts and on the held-out ones, over several seeds,
by margins larger than the seeds' own spread.

This runs the embedded default (shipped miniature pipeline and reward, default hyperparameters)
through the real driver in-process (`mode=local`; Ray mode is bit-identical, test_system.py)
for ITERATIONS iterations (the default run's length) with three training seeds, each in its own
process with one torch thread (three processes on two cores finish sooner than one process with
two threads running them in turn) through `bench/bench_learning.py`'s `one_run`, so its figures
are that benchmark's. Evaluation is the driver's own: ODE samples at the fixed eval seed on the 16 training
prompts x 4 images and on the 24 held-out prompts x 4 images, so all seeds start from the same
numbers and differ only by what they learned.
"""
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor

import pytest

from bench.bench_learning import one_run
from treegrpo_ray.config import load_config

SEEDS = (0, 1, 2)
ITERATIONS = load_config(None, []).iterations
TRAIN_MARGIN = 0.08     # mean training-prompt gain the default must show (measured: see README "Learning")
HELD_OUT_MARGIN = 0.03  # mean held-out gain, every seed above 0 (issue 15's goal is +0.05; see README)


def _check(name: str, gains: list[float], margin: float) -> None:
    mean, sd = statistics.mean(gains), statistics.stdev(gains)
    print(f"{name}: gains {', '.join(f'{g:+.3f}' for g in gains)}; mean {mean:+.3f}, sd over seeds {sd:.3f}")
    assert min(gains) > 0, f"{name}: a seed lost reward: gains {gains}"
    assert mean > margin, f"{name}: mean gain {mean:.3f} below the stated margin {margin}: gains {gains}"
    assert mean > 2 * sd / len(gains) ** 0.5, f"{name}: mean gain {mean:.3f} within 2 standard errors of 0: gains {gains}"


@pytest.mark.learning
@pytest.mark.integration  # ~29 min beside the rest of the integration tier (~30 core-min); never in the default one.
# 36 iterations would pass today, but within 0.01 of the held-out bounds (BENCHMARKS.md §17): 48 it is
def test_default_run_learns_and_generalises():
    # niced to 19, below Ray's workers (Ray starts them at niceness 15, its `worker_niceness`): the
    # integration tier's other worker runs process-startup-bound Ray tests beside this CPU-bound
    # one, and at niceness 0 (10 on 2026-12-07 evening) its three processes outweighed every Ray
    # actor ~28:1 (~3:1) for the CPU. A run's bits do not depend on its priority.
    with ProcessPoolExecutor(len(SEEDS), mp_context=multiprocessing.get_context("spawn"),
                             initializer=os.nice, initargs=(19,)) as pool:
        # the benchmark's own run (each in its own temporary output folder), with no arm overrides
        runs = [(*r["eval"], *r["held_out"]) for r in pool.map(one_run, ["default"] * len(SEEDS), [[]] * len(SEEDS),
                                                                 SEEDS, [ITERATIONS] * len(SEEDS))]
    for seed, (t0, t1, h0, h1) in zip(SEEDS, runs):
        print(f"seed {seed}: eval reward {t0:.3f} -> {t1:.3f} ({t1 - t0:+.3f}); held-out {h0:.3f} -> {h1:.3f} ({h1 - h0:+.3f})")
    _check("training prompts", [t1 - t0 for t0, t1, _, _ in runs], TRAIN_MARGIN)
    _check("held-out prompts", [h1 - h0 for _, _, h0, h1 in runs], HELD_OUT_MARGIN)
