"""Bad input, caught: NaN/inf rewards and exploding losses mid-run (skip, count, stop after a
bound, never NaN weights on disk), and files or pools that cannot work rejected before any actor
or model starts. Config-load errors themselves are covered by tests/test_config.py.

All runs are in-process (mode=local) on the tiny random SD3 pipeline with the weight-free JPEG
reward: 2 prompts x 2**2 leaves = 8 leaves and 2 x 3 = 6 decisions per iteration."""
import math

import mlflow
import pytest
import ray
import torch

from treegrpo_ray import builders, driver
from treegrpo_ray.actors import ray_system
from treegrpo_ray.checkpoint import list_checkpoints, load_checkpoint
from treegrpo_ray.config import ConfigError, load_config
from treegrpo_ray.learning.learner import GRPOLearner, TrainingDiverged



@pytest.fixture(autouse=True)
def own_mlflow_store(monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which would send the next in-process
    run to the previous run's store; each test here reads its own tmp_path store."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")


def smoke_cfg(tiny_sd3_dir, tmp_path, *extra):
    return load_config("configs/smoke.yaml", [
        f"model.pretrained={tiny_sd3_dir}", "prompts=configs/prompts/example_prompts.txt",
        "rewards.terms.0.name=jpeg_compressibility", f"tracking.output_dir={tmp_path}", "tracking.run_name=r",
        "tracking.progress=false", "mode=local", *extra])


def metric(tmp_path, key):
    """[(step, value)] of `key` in the single MLflow run under tmp_path, and that run's status."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("treegrpo").experiment_id])
    hist = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
    return [(m.step, m.value) for m in hist], run.info.status


def all_finite(ckpt) -> bool:
    model, _, _ = load_checkpoint(ckpt)
    return all(bool(torch.isfinite(t).all()) for t in model.values())


# ----------------------------------------------------------------------------- NaN / inf rewards

@pytest.fixture
def poison_rewards(monkeypatch):
    """poison(calls) -> after it, reward call i gets NaN/inf at the leaf indices calls[i] names."""
    def poison(calls: dict[int, list[int]]):
        real = builders.build_reward_model

        def build(cfg, device=None):
            model = real(cfg, device)
            score, seen = model.score_latents_timed, [0]

            def score_latents_timed(latents, prompts):
                out, seconds = score(latents, prompts)
                bad = calls.get(seen[0], [])
                seen[0] += 1
                for n, r in out.items():
                    for j, leaf in enumerate(bad):
                        r[leaf] = float("nan") if j % 2 == 0 else float("inf")
                return out, seconds
            model.score_latents_timed = score_latents_timed
            return model
        monkeypatch.setattr(builders, "build_reward_model", build)
    return poison


def test_nonfinite_rewards_within_bound_are_dropped_and_counted(tiny_sd3_dir, tmp_path, poison_rewards):
    # max_nonfinite_fraction 0.25 x 8 leaves = 2 leaves may be dropped: iteration 0 loses 1 (NaN),
    # iteration 1 loses 2 (NaN + inf), iteration 2 none.
    poison_rewards({0: [3], 1: [0, 5]})
    summary = driver.run(smoke_cfg(tiny_sd3_dir, tmp_path, "iterations=3"))
    dropped, status = metric(tmp_path, "reward/dropped_leaves")
    assert dropped == [(1, 1.0), (2, 2.0), (3, 0.0)] and status == "FINISHED"
    assert all(math.isfinite(r) for r in summary["train_rewards"])      # mean over the finite leaves only
    losses, _ = metric(tmp_path, "loss/total")  # the tracker logs finite values only: all 3 present
    assert [s for s, _ in losses] == [1, 2, 3]
    assert all(all_finite(c) for c in list_checkpoints(tmp_path / "r" / "checkpoints"))


def test_too_many_nonfinite_rewards_stop_the_run_and_keep_the_last_checkpoint(tiny_sd3_dir, tmp_path, poison_rewards):
    # iteration 1: 3 of 8 leaves non-finite > 0.25 x 8 = 2 -> stop before the update
    poison_rewards({1: [0, 2, 4]})
    with pytest.raises(RuntimeError, match=r"3 of 8 leaves have non-finite rewards.*max_nonfinite_fraction=0.25"):
        driver.run(smoke_cfg(tiny_sd3_dir, tmp_path, "iterations=3"))
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [c.name for c in ckpts] == ["iter_000001"] and all_finite(ckpts[0])
    assert load_checkpoint(ckpts[0])[2]["next_iteration"] == 1          # resumable from there
    steps, status = metric(tmp_path, "reward/combined")
    assert [s for s, _ in steps] == [1] and status == "FAILED"
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "r" / "checkpoints").iterdir())


# ----------------------------------------------------------------------------- exploding losses

def scale_loss(monkeypatch, factor_of_version):
    """Multiply the learner's loss by factor_of_version(update index) (one update per iteration)."""
    real = GRPOLearner._loss

    def loss(self, *args, **kwargs):
        value, metrics = real(self, *args, **kwargs)
        return value * factor_of_version(self.version), metrics
    monkeypatch.setattr(GRPOLearner, "_loss", loss)


def test_nonfinite_and_exploding_updates_are_skipped_and_counted(tiny_sd3_dir, tmp_path, monkeypatch):
    # update 1: NaN loss -> NaN grad norm -> skipped. Updates 0, 2..5 record 5 grad norms, so the
    # running median exists at update 6, whose loss x 1e8 makes its norm ~1e8 x a normal one
    # > explode_factor (100) x median -> skipped. 7 iterations, keep all checkpoints.
    factors = {1: float("nan"), 6: 1e8}
    scale_loss(monkeypatch, lambda v: factors.get(v, 1.0))
    driver.run(smoke_cfg(tiny_sd3_dir, tmp_path, "iterations=7", "checkpoint.keep=7"))
    skipped, status = metric(tmp_path, "learner/skipped_updates")
    assert [v for _, v in skipped] == [0, 1, 0, 0, 0, 0, 1] and status == "FINISHED"
    ckpts = {c.name: load_checkpoint(c)[0] for c in list_checkpoints(tmp_path / "r" / "checkpoints")}
    assert len(ckpts) == 7 and all(torch.isfinite(t).all() for m in ckpts.values() for t in m.values())

    def same(a, b):
        return all(torch.equal(ckpts[a][k], ckpts[b][k]) for k in ckpts[a])
    assert same("iter_000001", "iter_000002") and same("iter_000006", "iter_000007")  # skipped: untouched
    assert not same("iter_000002", "iter_000003")                                       # a good update moves them


def test_consecutive_bad_updates_stop_the_run_without_nan_on_disk(tiny_sd3_dir, tmp_path, monkeypatch):
    # every loss is NaN; max_bad_updates=2: update 0 skipped (1 in a row), checkpoint 1 written,
    # update 1 skipped (2 in a row) -> TrainingDiverged; the checkpoint still holds the initial weights.
    scale_loss(monkeypatch, lambda v: float("nan"))
    initial = builders.build_policy(smoke_cfg(tiny_sd3_dir, tmp_path)).state_for_broadcast()
    with pytest.raises(TrainingDiverged, match="2 consecutive updates skipped"):
        driver.run(smoke_cfg(tiny_sd3_dir, tmp_path, "iterations=4", "learner.max_bad_updates=2"))
    ckpts = list_checkpoints(tmp_path / "r" / "checkpoints")
    assert [c.name for c in ckpts] == ["iter_000001"]
    model, _, _ = load_checkpoint(ckpts[0])
    assert all(torch.equal(model[k], initial[k]) for k in initial)
    assert metric(tmp_path, "learner/skipped_updates") == ([(1, 1.0)], "FAILED")


# ----------------------------------------------------------------------------- before anything starts

@pytest.fixture
def nothing_may_start(monkeypatch):
    """Fail the test if a system (models, actors) or a Ray instance is started."""
    def refuse(*args, **kwargs):
        raise AssertionError("started before the bad input was rejected")
    monkeypatch.setattr(driver, "build_system", refuse)
    monkeypatch.setattr(ray, "init", refuse)


@pytest.mark.parametrize("override, message", [
    ("prompts=configs/prompts/no_such_file.txt", "prompt file .* does not exist"),
    ("model.pretrained=/nonexistent/pipeline", "local directory '/nonexistent/pipeline' does not exist"),
    ("model.pretrained={tmp_path}", "has no model_index.json, so it is not a diffusers pipeline directory"),
    ("checkpoint.resume=/nonexistent/checkpoints/iter_000010", "is not a checkpoint directory"),
    ("rewards.terms.0.name=hpsv2 rewards.terms.0.checkpoint=/nonexistent/hps.pt",
     r"rewards.terms.0.checkpoint: '/nonexistent/hps.pt' does not"),
])
def test_missing_files_fail_before_any_actor_starts(tiny_sd3_dir, tmp_path, nothing_may_start, override, message):
    with pytest.raises(ConfigError, match=message):
        driver.run(smoke_cfg(tiny_sd3_dir, tmp_path, *override.format(tmp_path=tmp_path).split()))
    assert not (tmp_path / "mlflow.db").exists()  # not even an MLflow run was opened


def test_empty_prompt_file_fails_before_any_actor_starts(tiny_sd3_dir, tmp_path, nothing_may_start):
    empty = tmp_path / "prompts.txt"
    empty.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        driver.run(smoke_cfg(tiny_sd3_dir, tmp_path, f"prompts={empty}"))


@pytest.mark.parametrize("override, message", [
    ("pools.sampler.resources.sampler_slot=1", r"custom resources \['sampler_slot'\] but no cluster"),
    ("pools.reward.num_gpus=64", "pools request 64.0 GPUs but this machine has"),
])
def test_unplaceable_pools_fail_before_ray_starts(tiny_sd3_dir, tmp_path, monkeypatch, nothing_may_start,
                                                  override, message):
    # No cluster given: connect() must refuse before it would start a local instance.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    with pytest.raises(ConfigError, match=message):
        ray_system.connect(smoke_cfg(tiny_sd3_dir, tmp_path, "mode=ray", override))


@pytest.mark.ray
@pytest.mark.parametrize("override, resource", [
    ("pools.sampler.resources.sampler_slot=1", "sampler_slot"),
    ("learner.resources.resources.learner_slot=1", "learner_slot"),
    ("pools.sampler.num_gpus=1", "GPU"),
])
def test_pools_the_cluster_cannot_place_fail_before_any_actor(tiny_sd3_dir, tmp_path, ray_local, monkeypatch,
                                                             override, resource):
    # A joined cluster (the shared local one) that lacks the resource: RaySystem refuses before
    # the weight store, the first actor it would create.
    monkeypatch.delenv("TREEGRPO_ALLOW_PENDING", raising=False)

    class NoActors:
        @staticmethod
        def remote(*args, **kwargs):
            raise AssertionError("an actor was created before the placement check")

        @classmethod
        def options(cls, **kwargs):
            return cls
    from treegrpo_ray.actors import pools
    monkeypatch.setattr(pools, "WeightStore", NoActors)
    with pytest.raises(ConfigError, match=f"resource '{resource}' but no node in the cluster has it"):
        ray_system.RaySystem(smoke_cfg(tiny_sd3_dir, tmp_path, "mode=ray", override))
