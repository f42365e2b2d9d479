"""The run folder's figures: the curve's data by hand, and which files appear when."""
import io

import torch
from PIL import Image

from treegrpo_ray import report
from treegrpo_ray.diagnose import diagnose


def test_series_puts_each_curve_on_training_seconds_by_hand():
    history = {"time/iter_s": [(1, 2.0), (2, 3.0), (3, 5.0)],
               "reward/combined": [(2, 0.6), (1, 0.5), (3, 0.7)],   # MLflow's order is not promised
               "eval/reward": [(0, 0.4), (3, 0.8)]}
    s = report.series(history)
    assert s["reward/combined"] == ([1, 2, 3], [2.0, 5.0, 10.0], [0.5, 0.6, 0.7])
    assert s["eval/reward"] == ([0, 3], [0.0, 10.0], [0.4, 0.8])   # step 0 is before training: 0 s
    assert "eval_held_out/reward" not in s


def test_write_makes_the_curve_and_the_before_after_grid(tmp_path):
    run_dir = str(tmp_path / "run")
    history = {"time/iter_s": [(1, 1.0), (2, 1.0)], "reward/combined": [(1, 0.5), (2, 0.6)],
               "eval/reward": [(0, 0.4), (2, 0.5)], "eval_held_out/reward": [(0, 0.3), (2, 0.35)]}
    assert report.write(run_dir, history, last_step=2) == [f"{run_dir}/reward_curve.png"]  # no grids yet
    before, after = torch.zeros(4, 3, 8, 8), torch.ones(4, 3, 8, 8)
    report.save_grid(run_dir, 0, before)
    report.save_grid(run_dir, 2, after)
    grid = Image.open(tmp_path / "run" / "samples" / "iter_000002.png")
    assert grid.size == (4 * (8 + 2), 8 + 2)                       # one row of 4, 2 px padding (make_grid)
    assert grid.getpixel((0, 0)) == (255, 255, 255)
    written = report.write(run_dir, history, last_step=2, title="tree, run")
    assert written == [f"{run_dir}/reward_curve.png", f"{run_dir}/samples.png"]
    both = Image.open(io.BytesIO((tmp_path / "run" / "samples.png").read_bytes()))
    assert both.size[0] >= 640 and both.size[1] > both.size[0] / 4  # two grids, one above the other, enlarged


def test_diagnosis_line_the_driver_prints():
    # 4 samplers busy 40 s in a 12 s wall -> stage 10 s; reward 1 actor 3 s > 10% of 10 s -> 3 actors
    d = diagnose({"sampler": 40.0, "reward": 3.0, "learner": 1.0}, {"sampler": 4, "reward": 1, "learner": 1},
                 wall_s=12.0)
    assert d.summary() == "bottleneck=sampler sampler_idle=17% reward->3"
