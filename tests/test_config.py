"""Config loading: defaults, YAML + overrides, and the errors promised for bad input."""
import pytest

from treegrpo_ray.config import Config, ConfigError, decisions_per_iteration, describe, flatten, load_config


def test_defaults_are_the_miniature_run():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.tree.variant, cfg.tree.k, cfg.tree.depth, cfg.tree.num_steps) == ("tree", 3, 3, 10)
    # 8 prompts x (3**3 - 1) / (3 - 1) = 8 x 13 decisions
    assert decisions_per_iteration(cfg) == 104


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("tree:\n  k: 2\n  depth: 4\nlearner:\n  lr: 1.0e-5\n")
    cfg = load_config(path, ["tree.depth=2", "learner.lr=3e-4", "rewards.terms.0.weight=2",
                             "pools.sampler.resources={sampler_slot: 1}"])
    assert cfg.tree.k == 2 and cfg.tree.depth == 2          # YAML, then the override wins
    assert cfg.learner.lr == 3e-4                           # "3e-4" is a string to YAML 1.1; coerced
    assert cfg.rewards.terms[0].weight == 2.0
    assert cfg.pools.sampler.resources == {"sampler_slot": 1.0}


def test_list_append_override():
    cfg = load_config(None, ["rewards.terms.1.name=jpeg_compressibility", "rewards.terms.1.weight=0.5"])
    assert [t.name for t in cfg.rewards.terms] == ["miniature", "jpeg_compressibility"]


def test_every_shipped_config_loads():
    import pathlib
    files = sorted(pathlib.Path("configs").glob("*.yaml"))
    assert len(files) >= 6
    for f in files:
        load_config(f)


BAD = [
    (["tree.kk=3"], "unknown config key 'tree.kk'"),
    (["nonsense=1"], "unknown config key 'nonsense'"),
    (["tree.k=1"], "tree.k: branching factor 1 < 2"),
    (["tree.k=three"], "tree.k must be an integer"),
    (["tree.k=2.5"], "tree.k must be an integer"),
    (["tree.depth=0"], "tree.depth: window depth 0 < 1"),
    (["tree.depth=11"], "does not fit in 10 steps"),
    (["tree.max_window_start=8"], "tree.max_window_start: window starting at 8 runs past"),
    (["tree.variant=beam"], "tree.variant: 'beam' is not one of tree, flat, mix"),
    (["tree.window=zigzag"], "tree.window"),
    (["tree.noise_level=-1"], "tree.noise_level"),
    (["tree.train_fraction=0"], "tree.train_fraction"),
    (["tree.share_initial_noise=maybe"], "must be true or false"),
    (["learner.lr=0"], "learner.lr"),
    (["learner.lr=abc"], "learner.lr must be a number"),
    (["learner.clip_eps=-0.1"], "learner.clip_eps"),
    (["learner.betas=[0.9]"], "learner.betas"),
    (["learner.workers=5"], "do not split evenly into workers x minibatches = 5"),
    (["learner.strategy=fsdp"], "fsdp needs GPUs"),
    (["tree.variant=flat", "tree.group_size=27", "learner.edge_baseline=parent"], "compares siblings"),
    (["learner.adv_std=group"], "learner.adv_std"),
    (["rewards.terms.0.name=aesthetic"], "unknown reward 'aesthetic'"),
    (["rewards.terms.0.weight=0"], "weights sum to 0.0"),
    (["rewards.terms.0.weight=.nan"], "is not finite"),
    (["rewards.terms.1.name=miniature"], "duplicate reward names"),
    (["rewards.aggregate=max"], "rewards.aggregate"),
    (["rewards.terms.0.name=clipscore"], "clipscore needs a local open_clip checkpoint"),
    (["prompts_per_iteration=3", "pools.samplers=2"], "do not split evenly over 2 samplers"),
    (["pools.samplers=0"], "each pool needs >= 1 actor"),
    (["pools.reward.resources={reward_slot: 0}"], "pools.reward.resources.reward_slot"),
    (["pools.sampler=4"], "pools.sampler must be a mapping"),
    (["model.dtype=float8"], "model.dtype"),
    (["model.kind=ddim"], "not supported by the policy loader yet"),
    (["model.resolution=30"], "not a positive multiple of 8"),
    (["model.device=cuda"], "request no GPU"),
    (["iterations=0"], "iterations"),
    (["max_staleness=-1"], "max_staleness"),
    (["mode=cluster"], "mode: 'cluster' is not one of ray, local"),
    (["prompts="], "prompts: is empty"),
    (["tree.k"], "must look like key=value"),
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_config_names_field_and_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("tree: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_flatten_redacts_secrets():
    cfg = load_config(None, ["tracking.mlflow_uri=https://user:hunter2@mlflow.example/"])
    flat = flatten(cfg)
    assert flat["tracking.mlflow_uri"] == "***"
    assert flat["tree.k"] == "3"
    assert "hunter2" not in " ".join(flat.values())


def test_every_field_documented():
    lines = describe()
    assert all("--" in line and line.split("--", 1)[1].strip() for line in lines)
    assert any(line.startswith("tree.k = 3") for line in lines)


def test_prompt_sets(tmp_path):
    from treegrpo_ray.builders import load_prompts
    from treegrpo_ray.toy.world import demo_prompts, split_prompts
    train, held = split_prompts()
    cfg = load_config(None, ["eval_prompts=4"])
    assert load_prompts(cfg, "train") == demo_prompts()
    assert load_prompts(cfg, "eval") == demo_prompts()[:4]   # eval scores what RL trains on ...
    assert load_prompts(cfg, "held_out") == held              # ... and what it never sees
    assert load_prompts(load_config(None, ["prompts=miniature-all"]), "train") == train
    (tmp_path / "p.txt").write_text("# a comment\na cat\n\na dog\n")
    cfg = load_config(None, [f"prompts={tmp_path / 'p.txt'}", "eval_prompts=1"])
    assert (load_prompts(cfg, "train"), load_prompts(cfg, "eval"), load_prompts(cfg, "held_out")) == \
        (["a cat", "a dog"], ["a cat"], [])
    with pytest.raises(ConfigError, match="'miniature' / 'miniature-all'"):
        load_prompts(load_config(None, ["prompts=miniatur"]), "train")
