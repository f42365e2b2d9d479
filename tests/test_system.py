"""End-to-end runs of the driver on a tiny random SD3 pipeline with a weight-free reward:
in-process, on Ray, resume, and Ray == in-process for the same seed."""

import mlflow
import pytest
import torch

from treegrpo_ray.checkpoint import list_checkpoints, load_checkpoint
from treegrpo_ray.config import load_config
from treegrpo_ray.driver import progress_line, run


def smoke_cfg(tiny_sd3_dir, tmp_path, *extra):
    return load_config("configs/smoke.yaml", [
        f"model.pretrained={tiny_sd3_dir}", "prompts=configs/prompts/example_prompts.txt",
        "rewards.terms.0.name=jpeg_compressibility", f"tracking.output_dir={tmp_path}", "tracking.run_name=r",
        "tracking.progress=false", *extra])


def metric_steps(summary, key):
    client = mlflow.MlflowClient(summary["mlflow_uri"])
    return [(m.step, m.value) for m in sorted(client.get_metric_history(summary["mlflow_run_id"], key),
                                              key=lambda m: m.step)]


def test_local_run_writes_checkpoints_export_and_metrics(tiny_sd3_dir, tmp_path):
    summary = run(smoke_cfg(tiny_sd3_dir, tmp_path, "mode=local", "iterations=2"))
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [p.name for p in ckpts] == ["iter_000001", "iter_000002"]
    model, optim, state = load_checkpoint(ckpts[-1])
    assert state["next_iteration"] == 2 and state["mlflow_run_id"] == summary["mlflow_run_id"]
    assert optim is not None and all(torch.isfinite(t).all() for t in model.values())
    assert any((tmp_path / "r" / "export").iterdir())
    assert [s for s, _ in metric_steps(summary, "reward/combined")] == [1, 2]
    assert [s for s, _ in metric_steps(summary, "perf/nfe")] == [1, 2]


def test_staleness_one_trains_on_one_version_old_trees_with_the_decoupled_objective(tiny_sd3_dir, tmp_path):
    """max_staleness=1 in-process: iteration i+1's trees are grown while the learner trains on i's,
    so from iteration 2 on the learner is one version ahead of its trees; at the authors' clip
    eps 1e-4 the decoupled objective still trains (the plain one would clip the whole update away)."""
    summary = run(smoke_cfg(tiny_sd3_dir, tmp_path, "mode=local", "iterations=3", "max_staleness=1",
                            "learner.clip_eps=1e-4", "learner.stale_correction=decoupled"))
    lags = dict(metric_steps(summary, "staleness/lag"))
    assert lags == {1: 0.0, 2: 1.0, 3: 1.0}
    weights = dict(metric_steps(summary, "staleness/is_weight_mean"))
    assert sorted(weights) == [2, 3] and all(0.5 < w < 2.0 for w in weights.values())
    assert all(v == 0.0 for _, v in metric_steps(summary, "learner/skipped_updates"))


def test_staleness_one_recentred_trains_from_ratio_one(tiny_sd3_dir, tmp_path):
    """learner.stale_correction=recenter (the default) through the whole system: the samplers keep
    their means, the learner moves each stale child onto its current mean (same noise), so one minibatch's
    ratio starts at 1 and nothing is clipped at eps 1e-4; the shift it made is logged."""
    summary = run(smoke_cfg(tiny_sd3_dir, tmp_path, "mode=local", "iterations=3", "max_staleness=1",
                            "learner.clip_eps=1e-4"))  # recenter: the default correction
    assert dict(metric_steps(summary, "staleness/lag")) == {1: 0.0, 2: 1.0, 3: 1.0}
    moved = dict(metric_steps(summary, "staleness/shift_over_std"))
    assert sorted(moved) == [2, 3] and all(0 < v < 1 for v in moved.values())
    assert all(abs(v - 1) < 1e-4 for _, v in metric_steps(summary, "loss/ratio_mean"))
    assert all(v == 0.0 for _, v in metric_steps(summary, "loss/clip_frac"))
    assert metric_steps(summary, "staleness/is_weight_mean") == []


def test_progress_line_shows_the_stale_shift():
    """The user sees how far one version of lag moved the means (what decides staleness 1's cost)."""
    m = {"reward/combined": 0.5, "staleness/max_lag": 1.0, "staleness/shift_over_std": 0.0834}
    assert "| lag 1 (shift 0.083 std)" in progress_line(1, 30, m)
    assert progress_line(1, 30, {"staleness/max_lag": 0.0}).endswith("| lag 0")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bf16 full fine-tune: the float32 masters resume too
def test_resume_continues_the_same_run_and_replays_exactly(tiny_sd3_dir, tmp_path, dtype):
    full = run(smoke_cfg(tiny_sd3_dir, tmp_path / "full", "mode=local", "iterations=3", f"model.dtype={dtype}"))
    # "kill" after iteration 2, then resume to 3
    first = run(smoke_cfg(tiny_sd3_dir, tmp_path / "cut", "mode=local", "iterations=2", f"model.dtype={dtype}"))
    resumed = run(smoke_cfg(tiny_sd3_dir, tmp_path / "cut", "mode=local", "iterations=3", "checkpoint.resume=latest",
                            f"model.dtype={dtype}"))
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    steps = [s for s, _ in metric_steps(resumed, "reward/combined")]
    assert steps == [1, 2, 3]                              # no lost or duplicated iteration numbers
    a = dict(metric_steps(full, "loss/total"))[3]
    b = dict(metric_steps(resumed, "loss/total"))[3]
    assert a == b                                          # iteration 3 replayed as the uninterrupted run did it
    wa, _, _ = load_checkpoint(tmp_path / "full" / "r" / "checkpoints" / "iter_000003")
    wb, _, _ = load_checkpoint(tmp_path / "cut" / "r" / "checkpoints" / "iter_000003")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)    # the same bits


def test_ddpo_running_stats_travel_in_the_checkpoint_and_resume_exactly(tiny_sd3_dir, tmp_path):
    """DDPO's baseline (flat, per-prompt running statistics): the buffers are run state; a resumed
    run that lost them would normalise iteration 3 with the batch's statistics instead."""
    ddpo = ["mode=local", "tree.variant=flat", "tree.flat_steps=batch", "learner.edge_baseline=none",
            "advantage.stats=running", "advantage.buffer=8", "advantage.min_count=4", "advantage.eps=1e-6"]
    full = run(smoke_cfg(tiny_sd3_dir, tmp_path / "full", *ddpo, "iterations=3"))
    run(smoke_cfg(tiny_sd3_dir, tmp_path / "cut", *ddpo, "iterations=2"))
    resumed = run(smoke_cfg(tiny_sd3_dir, tmp_path / "cut", *ddpo, "iterations=3", "checkpoint.resume=latest"))
    _, _, state = load_checkpoint(tmp_path / "cut" / "r" / "checkpoints" / "iter_000002")
    assert state["adv_stats"] and all(1 <= len(v) <= 8 for v in state["adv_stats"].values())
    a, b = dict(metric_steps(full, "loss/total"))[3], dict(metric_steps(resumed, "loss/total"))[3]
    assert a == b
    wa, _, _ = load_checkpoint(tmp_path / "full" / "r" / "checkpoints" / "iter_000003")
    wb, _, _ = load_checkpoint(tmp_path / "cut" / "r" / "checkpoints" / "iter_000003")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.ray
def test_pipelined_ray_matches_local_for_the_same_seed(tiny_sd3_dir, tmp_path, ray_local):
    """2 samplers x 2 queued calls each (pools.sampler_calls) and max_staleness=1: iteration i+1's
    calls are queued before i is collected; the learner fetches the 4 batches by reference and
    merges them as the driver's infos said. Same requests, same weights, same bits as in-process
    on one thread (each actor's thread count, num_cpus=1). The unpipelined layout (one call per
    sampler, staleness 0) equals in-process bit for bit too: tests/test_cluster.py, across nodes.
    (One run for both layouts since issue 37: this was the integration tier's second-slowest test
    beside a default-tier twin for the unpipelined layout.)"""
    extra = ["iterations=3", "prompts_per_iteration=4", "pools.samplers=2", "pools.sampler_calls=2",
             "max_staleness=1"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local = run(smoke_cfg(tiny_sd3_dir, tmp_path / "local", "mode=local", *extra))
    finally:
        torch.set_num_threads(threads)
    on_ray = run(smoke_cfg(tiny_sd3_dir, tmp_path / "ray", "mode=ray", *extra))
    assert on_ray["train_rewards"] == local["train_rewards"]
    assert [v for _, v in metric_steps(on_ray, "staleness/lag")] == [0.0, 1.0, 1.0]
    wa, _, _ = load_checkpoint(tmp_path / "local" / "r" / "checkpoints" / "iter_000003")
    wb, _, _ = load_checkpoint(tmp_path / "ray" / "r" / "checkpoints" / "iter_000003")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # the driver fetched infos and rewards, not trees: a small fraction of the trees' bytes
    tree_bytes = [v for _, v in metric_steps(on_ray, "perf/tree_bytes")]
    driver_bytes = [v for _, v in metric_steps(on_ray, "perf/driver_bytes")]
    assert len(driver_bytes) == 3 and all(0 < d < 0.1 * t for d, t in zip(driver_bytes, tree_bytes))
    assert metric_steps(local, "perf/driver_bytes") == []  # in-process nothing passes through a driver


@pytest.mark.ray
@pytest.mark.integration  # 60 s alone, 2-5 min among the default tier's 3 workers (Ray Train's start under load)
def test_an_output_dir_the_learner_cannot_see_stops_the_run_before_training(tiny_sd3_dir, tmp_path, ray_local,
                                                                             monkeypatch):
    # A node-local output_dir on a multi-node cluster: the driver's probe file is not there for
    # the learner. Emulated by a probe the driver "wrote" where nothing is; the real learner looks.
    from treegrpo_ray import storage
    monkeypatch.setattr(storage, "write_probe", lambda root: storage.join(root, ".probe-on-another-node"))
    with pytest.raises(RuntimeError, match=r"is not shared: the driver wrote a file there that the learner on node "
                                           r"'.+' cannot see.*ReadWriteMany PVC.*s3://"):
        run(smoke_cfg(tiny_sd3_dir, tmp_path, "mode=ray", "iterations=1"))
    assert list_checkpoints(tmp_path / "r" / "checkpoints") == []


def test_both_systems_implement_the_system_protocol_the_driver_uses(tiny_sd3_dir, tmp_path):
    import inspect

    from treegrpo_ray.actors.ray_system import RaySystem
    from treegrpo_ray.local_system import LocalSystem
    from treegrpo_ray.system import System
    members = [n for n in System.__dict__ if not n.startswith("_") and callable(System.__dict__[n])]
    assert sorted(members) == ["close", "collect", "evaluate", "export", "launch", "save", "update"]
    for cls in (LocalSystem, RaySystem):
        for name in members:
            want = list(inspect.signature(getattr(System, name)).parameters)
            assert list(inspect.signature(getattr(cls, name)).parameters) == want, (cls.__name__, name)
    local = LocalSystem(smoke_cfg(tiny_sd3_dir, tmp_path, "mode=local"))
    assert isinstance(local, System) and local.version == 0
    assert isinstance(RaySystem.version, property)  # the learner group's version (no Ray started here)
