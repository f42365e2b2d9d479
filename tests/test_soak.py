"""A short soak (bench/soak.py): 30 iterations on Ray with 2 samplers; object store, the
driver's ObjectRefs and every process's memory must stay within soak.py's flatness bounds. The
200-iteration numbers are in the report of the reliability issue (python bench/soak.py)."""
import io

import pytest

from bench.soak import baseline_and_end, soak, soak_config, verdict

MIB = 1024 ** 2


def test_verdict_flags_growth():
    # baseline 1 MiB / 10 refs / one sampler at 500 MiB USS; bounds: +4 MiB, +4 refs, +max(64 MiB, 50 MiB)
    proc = {"role": "SamplerActor", "rss": 600 * MIB, "uss": 500 * MIB}
    base = {"iteration": 10, "store_bytes": MIB, "store_objects": 3, "driver_refs": 10, "procs": {"1": proc}}
    same = {**base, "iteration": 30}
    assert verdict(base, same)[0]
    assert not verdict(base, {**same, "store_bytes": 6 * MIB})[0]           # +5 MiB > 4
    assert not verdict(base, {**same, "driver_refs": 15})[0]                # +5 refs > 4
    grown = {"1": {**proc, "uss": 565 * MIB}}                               # +65 MiB > 64
    assert not verdict(base, {**same, "procs": grown})[0]
    assert not verdict(base, {**same, "procs": {}})[0]                      # the actor died


def test_object_store_is_judged_by_its_floor():
    # samples at 10..40: in-flight objects make the store swing 1 / 9 / 1 / 9 MiB; the floors of
    # the two halves are both 1 MiB -> flat. A leak that lifts the floor to 6 MiB is not.
    def at(it, store):
        return {"iteration": it, "store_bytes": store * MIB, "store_objects": 0, "driver_refs": 2, "procs": {}}
    swing = [at(5, 50), at(10, 1), at(20, 9), at(30, 1), at(40, 9)]
    before, after = baseline_and_end(swing, warmup=10)
    assert (before["store_bytes"], after["store_bytes"]) == (MIB, MIB) and verdict(before, after)[0]
    leak = [at(10, 1), at(20, 2), at(30, 6), at(40, 7)]
    assert not verdict(*baseline_and_end(leak, warmup=10))[0]


@pytest.mark.slow
@pytest.mark.ray
def test_short_soak_is_flat(tiny_sd3_dir, tmp_path, ray_local, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")  # keep MLflow in tmp_path
    printed = io.StringIO()
    result = soak(soak_config(str(tmp_path), str(tiny_sd3_dir), 30), warmup=10, every=10, out=printed)
    assert [s["iteration"] for s in result["samples"]] == [10, 20, 30]
    roles = {p["role"] for p in result["samples"][0]["procs"].values()}
    assert {"driver", "SamplerActor", "RewardActor", "RayTrainWorker", "WeightStore"} <= roles
    assert result["flat"], printed.getvalue()
