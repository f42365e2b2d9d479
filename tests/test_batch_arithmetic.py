"""One batch arithmetic (config.groups_per_iteration and what derives from it) that the sampler the
system builds actually produces, for every variant and for trees_per_prompt > 1; and flat and mix
through the learner and the driver, not only tree.

Hand counts for 2 prompts, trees_per_prompt=2, T=4:
  tree k=2 d=2: 4 trees x 4 leaves = 16 leaves; 4 x (1 + 2) = 12 decisions
  flat G=3, train_fraction 0.5, Flow-GRPO's steps: 4 groups x 3 = 12 leaves; 12 x int(0.5 * 4) = 24 decisions
  mix  G=3, d=2: 4 groups x 3 = 12 leaves; 12 x 2 = 24 decisions
(issue 15: build_sampler never passed trees_per_prompt, so a config of 2 gave half of these.)"""
import mlflow
import pytest
import torch

from treegrpo_ray import builders
from treegrpo_ray.config import decisions_per_iteration, leaves_per_iteration, load_config
from treegrpo_ray.driver import expected_nfe, run

VARIANTS = {
    "tree": (["tree.k=2", "tree.depth=2"], 16, 12),
    "flat": (["tree.variant=flat", "tree.group_size=3", "tree.train_fraction=0.5", "tree.flat_steps=flow_grpo",
             "learner.edge_baseline=none"], 12, 24),
    "mix": (["tree.variant=mix", "tree.group_size=3", "tree.depth=2", "learner.edge_baseline=none"], 12, 24),
}


def cfg_for(tiny_sd3_dir, tmp_path, variant, *extra):
    overrides, _, _ = VARIANTS[variant]
    return load_config("configs/smoke.yaml", [
        f"model.pretrained={tiny_sd3_dir}", "prompts=configs/prompts/example_prompts.txt",
        "rewards.terms.0.name=jpeg_compressibility", f"tracking.output_dir={tmp_path}", "tracking.run_name=r",
        "tracking.progress=false", "tree.trees_per_prompt=2", *overrides, *extra])


@pytest.fixture(scope="module")
def policy(tiny_sd3_dir, tmp_path_factory):
    torch.set_num_threads(1)
    return builders.build_policy(cfg_for(tiny_sd3_dir, tmp_path_factory.mktemp("p"), "tree"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_built_sampler_grows_what_the_config_counts(tiny_sd3_dir, tmp_path, policy, variant):
    cfg = cfg_for(tiny_sd3_dir, tmp_path, variant)
    _, leaves, decisions = VARIANTS[variant]
    assert (leaves_per_iteration(cfg), decisions_per_iteration(cfg)) == (leaves, decisions)   # the hand counts
    batch = builders.build_sampler(cfg, policy).sample(["a red circle", "a blue square"], window_start=1, seed=0)
    assert batch.num_leaves == leaves and batch.num_decisions == decisions
    assert batch.nfe == expected_nfe(cfg, 1)
    assert int(batch.tree_index.max()) + 1 == 4                              # 2 prompts x 2 trees, distinct


@pytest.mark.parametrize("variant", ["flat", "mix"])
def test_flat_and_mix_train_through_the_learner_and_driver(tiny_sd3_dir, tmp_path, variant, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    summary = run(cfg_for(tiny_sd3_dir, tmp_path, variant, "mode=local", "iterations=2", "tree.trees_per_prompt=1"))
    client = mlflow.MlflowClient(summary["mlflow_uri"])
    history = {k: [m.value for m in sorted(client.get_metric_history(summary["mlflow_run_id"], k), key=lambda m: m.step)]
               for k in ("tree/leaves", "weights/version", "learner/grad_norm")}
    assert history["tree/leaves"] == [6.0, 6.0]                             # 2 prompts x G=3
    assert history["weights/version"] == [1.0, 2.0]
    assert all(g > 0 and torch.isfinite(torch.tensor(g)) for g in history["learner/grad_norm"])  # the update moved weights


def test_sampler_calls_split_each_samplers_prompts_without_changing_the_iteration(tmp_path):
    """pools.sampler_calls=2 on 2 samplers: 4 requests of 2 prompts, consecutive pairs on one
    sampler (request j on sampler j // 2), the same 8 prompts and window as one call per sampler,
    each call its own noise seed; 1 call per sampler keeps the seeds it always had."""
    from treegrpo_ray.algo.seeds import sampler_seed
    from treegrpo_ray.driver import requests_for

    base = ["mode=local", "prompts_per_iteration=8", "pools.samplers=2", f"tracking.output_dir={tmp_path}"]
    one, two = (load_config(None, [*base, f"pools.sampler_calls={c}"]) for c in (1, 2))
    prompts = [f"prompt {i}" for i in range(20)]
    a, b = requests_for(one, prompts, 5), requests_for(two, prompts, 5)
    assert [len(r.prompts) for r in a] == [4, 4] and [len(r.prompts) for r in b] == [2, 2, 2, 2]
    assert [p for r in a for p in r.prompts] == [p for r in b for p in r.prompts]  # sampler 0 gets b[0] + b[1]
    assert {r.window_start for r in a + b} == {a[0].window_start}
    assert [r.seed for r in a] == [sampler_seed(one.seed, 5, i) for i in range(2)]
    assert [r.seed for r in b] == [sampler_seed(two.seed, 5, i) for i in range(4)]
    assert leaves_per_iteration(one) == leaves_per_iteration(two)
