"""Bottleneck diagnosis: hand-computed stage times, utilisations and suggested pool sizes."""
import subprocess
import sys
from pathlib import Path

import pytest

from treegrpo_ray.diagnose import OVERHEAD, diagnose


def test_reward_pool_is_the_bottleneck_and_gets_a_size():
    # 4 samplers busy 40 s in total -> sampler stage 40/4 = 10 s; 1 reward actor busy 12 s -> stage 12 s.
    # wall 23 s: explained 10 + 12 = 22 >= 11.5, so a pool (rewards, 12 > 10) is the limit.
    d = diagnose({"sampler": 40.0, "reward": 12.0}, {"sampler": 4, "reward": 1}, wall_s=23.0)
    assert d.bottleneck == "reward"
    assert d.stage_s == pytest.approx({"sampler": 10.0, "reward": 12.0})
    assert d.utilisation["sampler"] == pytest.approx(10 / 23)
    assert d.sampler_idle == pytest.approx(13 / 23)
    assert d.overhead_s == pytest.approx(1.0)  # 23 - 22
    # target 0.1 x 10 s = 1 s per reward stage -> ceil(12 s / 1 s) = 12 reward actors
    assert d.suggest == {"reward": 12}


def test_samplers_are_the_limit_when_the_other_pools_keep_up():
    # sampler stage 80/8 = 10 s; reward stage 4/4 = 1 s (= 0.1 x 10, not above the limit);
    # learner stage 6/2 = 3 s > 1 s -> suggest ceil(6 / 1) = 6 learner workers.
    d = diagnose({"sampler": 80.0, "reward": 4.0, "learner": 6.0}, {"sampler": 8, "reward": 4, "learner": 2},
                 wall_s=14.5)
    assert d.bottleneck == "sampler"
    assert d.suggest == {"learner": 6}
    assert d.sampler_idle == pytest.approx(1 - 10 / 14.5)
    assert "bottleneck=sampler" in d.summary() and "learner->6" in d.summary()


def test_overhead_when_no_pool_explains_half_the_wall():
    # stages 2/2 = 1 s and 0.5/1 = 0.5 s explain 1.5 s of a 4 s wall (< 2 s): driver/Ray overhead.
    d = diagnose({"sampler": 2.0, "reward": 0.5}, {"sampler": 2, "reward": 1}, wall_s=4.0)
    assert d.bottleneck == OVERHEAD
    assert d.overhead_s == pytest.approx(2.5)
    assert d.suggest == {"reward": 5}  # limit 0.1 x 1 s = 0.1 s -> ceil(0.5 / 0.1) = 5


def test_suggestion_never_shrinks_a_pool():
    # reward stage 3/4 = 0.75 s > limit 0.1 x 5 = 0.5 s, but ceil(3 / 0.5) = 6 > 4: grow to 6, never below 4.
    d = diagnose({"sampler": 5.0, "reward": 3.0}, {"sampler": 1, "reward": 4}, wall_s=6.0)
    assert d.suggest == {"reward": 6}


@pytest.mark.parametrize("busy,actors,wall", [
    ({"sampler": 1.0}, {"sampler": 1, "reward": 1}, 1.0),   # pools differ
    ({"reward": 1.0}, {"reward": 1}, 1.0),                   # no sampler pool
    ({"sampler": 1.0}, {"sampler": 0}, 1.0),                 # empty pool
    ({"sampler": 1.0}, {"sampler": 1}, 0.0),                 # zero wall
])
def test_bad_inputs_raise(busy, actors, wall):
    with pytest.raises(ValueError):
        diagnose(busy, actors, wall)


def test_module_imports_without_ray():
    code = "import sys, treegrpo_ray.diagnose; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
