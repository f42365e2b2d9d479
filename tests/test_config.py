"""Config loading: defaults, YAML + overrides, and the errors promised for bad input."""
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


# (overrides, the field the error must name first, what it must say)
BAD = [
    (["tree.kk=3"], "tree.kk", "unknown config key 'tree.kk'"),
    (["nonsense=1"], "nonsense", "unknown config key 'nonsense'"),
    (["tree.k=1"], "tree.k", "branching factor 1 < 2"),
    (["tree.k=three"], "tree.k", "must be an integer"),
    (["tree.k=2.5"], "tree.k", "must be an integer"),
    (["tree.depth=0"], "tree.depth", "window depth 0 < 1"),
    (["tree.depth=11"], "tree.depth", "does not fit in 10 steps"),
    (["tree.max_window_start=8"], "tree.max_window_start", "window starting at 8 runs past"),
    (["tree.variant=beam"], "tree.variant", "'beam' is not one of tree, flat, mix"),
    (["tree.window=zigzag"], "tree.window", "is not one of"),
    (["tree.noise_level=-1"], "tree.noise_level", "must be finite and >= 0"),
    (["tree.train_fraction=0"], "tree.train_fraction", "outside (0, 1]"),
    (["tree.variant=flat", "tree.train_fraction=0.1"], "tree.train_fraction",
     "trains no step under flat_steps=dancegrpo"),
    (["tree.flat_steps=ddpo"], "tree.flat_steps", "is not one of"),
    (["tree.window_stride=0"], "tree.window_stride", "must be >= 1"),
    (["tree.share_initial_noise=maybe"], "tree.share_initial_noise", "must be true or false"),
    (["learner.lr=0"], "learner.lr", "must be a finite number > 0"),
    (["learner.lr=abc"], "learner.lr", "must be a number"),
    (["learner.clip_eps=-0.1"], "learner.clip_eps", "must be a finite number > 0"),
    (["learner.betas=[0.9]"], "learner.betas", "is not two values in [0, 1)"),
    (["learner.workers=5"], "learner.workers x learner.minibatches", "do not split evenly into workers x minibatches = 5"),
    (["learner.workers=0"], "learner.workers", "must be >= 1"),
    (["learner.epochs=0"], "learner.epochs", "must be >= 1"),
    (["learner.max_bad_updates=0"], "learner.max_bad_updates", "must be >= 1"),
    (["learner.micro_batch=-1"], "learner.micro_batch", "must be >= 0"),
    (["learner.grad_clip=-1"], "learner.grad_clip", "must be a finite number >= 0"),
    (["learner.weight_decay=-1"], "learner.weight_decay", "must be a finite number >= 0"),
    (["learner.kl_beta=-1"], "learner.kl_beta", "must be a finite number >= 0"),
    (["learner.strategy=fsdp", "model.lora_rank=8"], "learner.strategy", "fsdp with LoRA"),
    (["rewards.terms.0.version=v2.1"], "rewards.terms.0.version", "reward 'miniature' does not take version"),
    (["eval_metrics=[foo]"], "eval_metrics", "unknown reward kind 'foo'"),
    (["eval_metrics=[miniature]"], "eval_metrics", "a training reward term already"),
    (["rewards.terms.0.name=jpeg_compressibility", "rewards.terms.0.checkpoint=x"], "rewards.terms.0.checkpoint",
     "does not take checkpoint (it takes: only name and weight)"),
    (["learner.strategy=fsdp", "learner.kl_beta=0.01"], "learner.strategy", "reference denoiser is not sharded"),
    (["tree.variant=flat", "tree.group_size=27", "learner.edge_baseline=parent"], "learner.edge_baseline",
     "compares siblings"),
    (["advantage.std=group"], "advantage.std", "is not one of"),
    (["advantage.min_count=32"], "advantage.min_count", "is more than the 16 rewards a prompt keeps"),
    (["advantage.stats=running", "rewards.aggregate=advantage"], "advantage.stats", "use rewards.aggregate=raw"),
    (["learner.kl_form=kl"], "learner.kl_form", "is not one of flow_grpo, exact"),
    (["learner.stale_correction=drop"], "learner.stale_correction", "is not one of recenter, decoupled, none"),
    (["pools.reply_timeout_s=0"], "pools.reply_timeout_s", "must be > 0"),
    (["rewards.terms.0.name=aesthetics"], "rewards.terms.0.name", "unknown reward 'aesthetics'"),
    (["rewards.terms.0.clip_checkpoint=x.safetensors"], "rewards.terms.0.clip_checkpoint",
     "reward 'miniature' does not take clip_checkpoint"),
    (["rewards.terms.0.name=hpsv2", "rewards.terms.0.processor=dir"], "rewards.terms.0.processor",
     "reward 'hpsv2' does not take processor"),
    (["rewards.terms.0.weight=0"], "rewards.terms.*.weight", "weights sum to 0.0"),
    (["rewards.terms.0.weight=.nan"], "rewards.terms.0.weight", "is not finite"),
    (["rewards.terms.1.name=miniature"], "rewards.terms", "duplicate reward names"),
    (["rewards.aggregate=max"], "rewards.aggregate", "is not one of"),
    (["prompts_per_iteration=3", "pools.samplers=2"], "prompts_per_iteration", "do not split evenly over 2 samplers"),
    (["pools.samplers=0"], "pools.samplers", "each pool needs >= 1"),
    (["pools.rewards=0"], "pools.rewards", "each pool needs >= 1"),
    (["pools.max_task_retries=-2"], "pools.max_task_retries", "must be >= -1"),
    (["pools.reward_chunk=-1"], "pools.reward_chunk", "must be >= 0"),
    (["pools.sampler_calls=0"], "pools.sampler_calls", "must be >= 1"),
    (["prompts_per_iteration=4", "pools.samplers=2", "pools.sampler_calls=4"], "pools.sampler_calls",
     "4 prompts do not split into 2 samplers x 4 calls"),
    (["pools.reward.num_gpus=-1"], "pools.reward.num_gpus", "must be >= 0"),
    (["pools.reward.resources={reward_slot: 0}"], "pools.reward.resources.reward_slot", "must be > 0"),
    (["pools.sampler=4"], "pools.sampler", "must be a mapping"),
    (["model.dtype=float8"], "model.dtype", "is not one of"),
    (["model.kind=vpred"], "model.kind", "is not one of auto, flow, ddim"),
    (["model.true_cfg_scale=0.5"], "model.true_cfg_scale", "is below 1"),
    (["model.resolution=30"], "model.resolution", "not a positive multiple of 8"),
    (["model.device=cuda"], "model.device", "request no GPU"),
    (["iterations=0"], "iterations", "0 < 1"),
    (["max_staleness=-1"], "max_staleness", "must be >= 0"),
    (["model.kind=ddim", "learner.kl_beta=0.1"], "learner.kl_form", "a DDIM model has only the exact step KL"),
    (["eval_every=-1"], "eval_every", "must be >= 0"),
    (["eval_prompts=0"], "eval_prompts", "must be >= 1"),
    (["checkpoint.every=-1"], "checkpoint.every", "must be >= 0"),
    (["checkpoint.keep=0"], "checkpoint.keep", "must be >= 1"),
    (["mode=cluster"], "mode", "'cluster' is not one of ray, local"),
    (["prompts="], "prompts", "is empty"),
    (["tracking.output_dir=ftp://host/x"], "tracking.output_dir", "'ftp://' is not one pyarrow.fs can open"),
    (["tracking.output_dir=s3://bucket/outputs"], "tracking.mlflow_uri", "cannot live"),
    (["tree.k"], "override 'tree.k'", "must look like key=value"),
]


@pytest.mark.parametrize("overrides,field,message", BAD, ids=[" ".join(o) for o, _, _ in BAD])
def test_bad_config_names_field_and_fix(overrides, field, message, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    text = str(err.value)
    assert message in text
    # the field the user set comes first (unknown keys: quoted in the message)
    assert text.startswith((f"{field}:", f"{field} ")) or f"'{field}'" in text.split(";")[0], text
    if text.startswith(f"{field}:"):          # invariant errors: "field: problem; fix"
        assert "; " in text and len(text.split("; ", 1)[1]) > 3, text


KEYS = sorted(flatten(Config()))
VALUES = st.one_of(st.integers(-5, 10 ** 6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                   st.text(max_size=12), st.sampled_from(["", "[]", "{}", "[0.9]", "{a: 1}", "null", "s3://", "-1e309"]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10)), VALUES), max_size=4))
def test_any_override_gives_a_config_or_a_config_error_naming_a_field(pairs):
    overrides = [f"{k}={v}" for k, v in pairs]
    try:
        load_config(None, overrides)
    except ConfigError as e:                  # never another exception type
        text = str(e)
        fields = [k for k in KEYS if k.split(".")[0] in text.split(":")[0].split(" ")[0]]
        assert fields or text.startswith(("unknown config key", "override")), text


def test_the_pipeline_family_is_checked_before_any_cluster(tmp_path):
    # builders.preflight reads model_index.json (no weights) and names the field and the fix
    from treegrpo_ray.builders import preflight
    preflight(load_config(None, ["model.kind=flow"]))                       # the miniature is an SD3 pipeline
    for overrides, message in ((["model.kind=ddim"], "model.kind: ddim but 'miniature' is a StableDiffusion3Pipeline "
                                                     "(flow); use model.kind=auto"),
                               (["model.true_cfg_scale=3"], "model.true_cfg_scale: only FLUX and Qwen-Image take it")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            preflight(load_config(None, overrides))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(ConfigError, match="model.pretrained: .* is a StableDiffusionXLPipeline; supported pipelines are "
                                          "StableDiffusion3Pipeline, FluxPipeline, StableDiffusionPipeline"):
        preflight(load_config(None, [f"model.pretrained={tmp_path}"]))


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
    assert flat["tracking.mlflow_uri"] == "https://***@mlflow.example/"
    assert flat["tree.k"] == "3"
    assert "hunter2" not in " ".join(flat.values())


def test_a_moved_key_names_its_new_name(tmp_path):
    # keys renamed by issue 37: an old YAML or override is an error that says what to write instead
    with pytest.raises(ConfigError, match="'learner.adv_clip' is now 'advantage.clip'"):
        load_config(overrides=["learner.adv_clip=3"])
    old = tmp_path / "old.yaml"
    old.write_text("learner:\n  cfg_grad: cond\n")
    with pytest.raises(ConfigError, match="'learner.cfg_grad' is now 'learner.guidance_grad'"):
        load_config(old)
    assert load_config(overrides=["advantage.clip=3", "learner.guidance_grad=cond"]).advantage.clip == 3.0


def test_choices_are_written_beside_their_fields_and_hold_the_defaults():
    from treegrpo_ray.config import choices, get_dotted
    found = choices()
    assert found["tree.variant"] == ("tree", "flat", "mix") and found["advantage.std"] == ("prompt", "batch", "none")
    assert {"learner.kl_form", "learner.stale_correction", "learner.guidance_grad", "mode"} <= set(found)
    for key, allowed in found.items():
        assert get_dotted(Config(), key) in allowed, key


def test_every_field_documented():
    lines = describe()
    assert all("--" in line and line.split("--", 1)[1].strip() for line in lines)
    assert any(line.startswith("tree.k = 3") for line in lines)


def test_prompt_sets(tmp_path):
    from treegrpo_ray.builders import load_prompts
    from treegrpo_ray.miniature.world import demo_prompts, split_prompts
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
