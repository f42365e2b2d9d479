"""The default run learns: TreeGRPO raises the miniature reward, over several seeds, by a margin
larger than the seeds' own spread.

This runs the embedded default (shipped miniature pipeline and reward, default hyperparameters)
through the real driver in-process (`mode=local`; Ray mode is bit-identical, test_system.py)
for ITERATIONS iterations with three training seeds. Evaluation is the driver's own: ODE
samples at the fixed eval seed, 16 training prompts x 4 images, so all seeds start from the same
number and differ only by what they learned.
"""
import io
import os
import statistics

import pytest
import torch

from treegrpo_ray.config import load_config
from treegrpo_ray.driver import run

ITERATIONS = 16
SEEDS = (0, 1, 2)
MARGIN = 0.04  # mean eval-reward gain the default must show after ITERATIONS iterations


@pytest.fixture
def all_cores():
    """Other test modules pin torch to 1 thread at import; this one trains for minutes, as the
    default run does with 2 threads per stage."""
    before = torch.get_num_threads()
    torch.set_num_threads(min(os.cpu_count() or 1, 4))
    yield
    torch.set_num_threads(before)


@pytest.mark.learning
@pytest.mark.integration  # ~7 min: CI runs it in the second tier, so the default tier stays near 20 min
def test_default_run_raises_the_miniature_reward(tmp_path, all_cores):
    gains = []
    for seed in SEEDS:
        cfg = load_config(None, ["mode=local", f"seed={seed}", f"iterations={ITERATIONS}", f"eval_every={ITERATIONS}", "eval_images_per_prompt=4",
                                 "checkpoint.every=0", "tracking.progress=false", "tracking.sample_grid_every=0",
                                 f"tracking.output_dir={tmp_path}", f"tracking.run_name=seed{seed}"])
        summary = run(cfg, out=io.StringIO())
        first, last = summary["eval_rewards"][0], summary["eval_rewards"][-1]
        gains.append(last - first)
        print(f"seed {seed}: eval reward {first:.3f} -> {last:.3f} ({last - first:+.3f}); held-out "
              f"{summary['eval_held_out_rewards'][0]:.3f} -> {summary['eval_held_out_rewards'][-1]:.3f}")
    mean, sd = statistics.mean(gains), statistics.stdev(gains)
    print(f"gain mean {mean:+.3f}, sd over seeds {sd:.3f}")
    assert min(gains) > 0, f"a seed lost reward: gains {gains}"
    assert mean > MARGIN, f"mean gain {mean:.3f} below the stated margin {MARGIN}: gains {gains}"
    assert mean > 2 * sd / len(gains) ** 0.5, f"mean gain {mean:.3f} within 2 standard errors of 0: gains {gains}"
