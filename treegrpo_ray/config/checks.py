"""The config's invariants between fields, in one place (`validate`), each failure a ConfigError
that names the field and the fix; and the batch arithmetic every stage derives its counts from."""
from __future__ import annotations

import math
import os

from treegrpo_ray import storage
from treegrpo_ray.algo.tree import flat_train_count
from treegrpo_ray.config.schema import Config, ConfigError, choices, get_dotted
from treegrpo_ray.rewards.kinds import REWARD_KINDS, TERM_FILE_FIELDS
from treegrpo_ray.rewards.kinds import TAKES as REWARD_TAKES


def _check(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}; {fix}")


def validate(cfg: Config) -> Config:
    """Every cross-field invariant, in one place. Raises ConfigError naming the field and fix."""
    for key, allowed in choices().items():
        value = get_dotted(cfg, key)
        _check(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}", "pick one of those")
    _validate_tree(cfg)
    _check(cfg.model.true_cfg_scale >= 1 and math.isfinite(cfg.model.true_cfg_scale), "model.true_cfg_scale",
           f"{cfg.model.true_cfg_scale} is below 1", "use 1 (off) or e.g. 4 for FLUX true CFG")
    _check(cfg.model.resolution > 0 and cfg.model.resolution % 8 == 0, "model.resolution",
           f"{cfg.model.resolution} is not a positive multiple of 8", "use e.g. 32 (miniature) or 512")
    _check(cfg.model.num_frames == 0 or (cfg.model.num_frames >= 1 and (cfg.model.num_frames - 1) % 4 == 0),
           "model.num_frames", f"{cfg.model.num_frames} is not of the form 4k + 1 (Wan's VAE: the first frame, then "
           "4 frames per latent frame)", "use e.g. 9, 33 or 81, or 0 for the pipeline's default")
    _check(cfg.model.lora_rank >= 0, "model.lora_rank", "must be >= 0", "use 0 for full fine-tune")
    _check(cfg.model.max_sequence_length >= 1, "model.max_sequence_length", "must be >= 1", "use e.g. 16 or 256")
    _validate_learner(cfg)
    _validate_advantage(cfg)
    _validate_rewards(cfg)
    _validate_pools(cfg)
    _check(cfg.iterations >= 1, "iterations", f"{cfg.iterations} < 1", "train at least 1 iteration")
    _check(cfg.prompts_per_iteration >= 1, "prompts_per_iteration", "must be >= 1", "use e.g. 4")
    _check(cfg.prompts_per_iteration % cfg.pools.samplers == 0, "prompts_per_iteration",
           f"{cfg.prompts_per_iteration} prompts do not split evenly over {cfg.pools.samplers} samplers",
           "make prompts_per_iteration a multiple of pools.samplers")
    calls = cfg.pools.samplers * cfg.pools.sampler_calls
    _check(cfg.prompts_per_iteration % calls == 0, "pools.sampler_calls",
           f"{cfg.prompts_per_iteration} prompts do not split into {cfg.pools.samplers} samplers x "
           f"{cfg.pools.sampler_calls} calls", "make prompts_per_iteration a multiple of pools.samplers x "
           "pools.sampler_calls, or lower pools.sampler_calls")
    _check(cfg.max_staleness >= 0, "max_staleness", "must be >= 0", "use 0 for strictly on-policy")
    _check(cfg.eval_images_per_prompt >= 1, "eval_images_per_prompt", "must be >= 1", "use e.g. 4")
    _check(cfg.eval_every >= 0, "eval_every", f"{cfg.eval_every} must be >= 0", "use e.g. eval_every=5, or 0 for none")
    _check(cfg.eval_prompts >= 1, "eval_prompts", f"{cfg.eval_prompts} must be >= 1", "use e.g. eval_prompts=16")
    _check(cfg.prompts.strip() != "", "prompts", "is empty", "use 'miniature' or a prompt file path")
    _validate_outputs(cfg)
    _check(cfg.checkpoint.every >= 0, "checkpoint.every", f"{cfg.checkpoint.every} must be >= 0",
           "use e.g. checkpoint.every=10, or 0 for only the last iteration")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", f"{cfg.checkpoint.keep} must be >= 1", "use e.g. checkpoint.keep=2")
    return cfg


def _validate_tree(cfg: Config) -> None:
    t = cfg.tree
    _check(t.num_steps >= 2, "tree.num_steps", f"{t.num_steps} steps is too few", "use >= 2 (paper: 10)")
    _check(t.depth >= 1, "tree.depth", f"window depth {t.depth} < 1", "use depth >= 1 (paper: 3)")
    _check(t.depth <= t.num_steps, "tree.depth", f"window of {t.depth} steps does not fit in {t.num_steps} steps",
           "lower tree.depth or raise tree.num_steps")
    if t.variant == "tree":
        _check(t.k >= 2, "tree.k", f"branching factor {t.k} < 2 grows no tree", "use k >= 2 (paper: 3)")
        _check(t.k ** t.depth <= 4096, "tree.k", f"k**depth = {t.k ** t.depth} leaves per tree is too many",
               "lower tree.k or tree.depth")
    _check(t.max_window_start <= t.num_steps - t.depth, "tree.max_window_start",
           f"window starting at {t.max_window_start} runs past the last step {t.num_steps - 1} with depth {t.depth}",
           f"use at most num_steps - depth = {t.num_steps - t.depth}, or -1")
    _check(t.max_window_start >= -1, "tree.max_window_start", "must be >= -1", "use -1 for 'num_steps - depth'")
    _check(t.shift_every >= 1, "tree.shift_every", "must be >= 1", "use 1 to shift every iteration")
    _check(t.window_stride >= 1, "tree.window_stride", "must be >= 1", "use 1 to move one step per shift")
    _check(t.noise_level >= 0 and math.isfinite(t.noise_level), "tree.noise_level", "must be finite and >= 0",
           "use e.g. 0.7")
    _check(t.group_size >= 0, "tree.group_size", "must be >= 0", "use 0 for k**depth")
    _check(0 < t.train_fraction <= 1, "tree.train_fraction", f"{t.train_fraction} is outside (0, 1]", "use e.g. 0.6")
    _check(t.trees_per_prompt >= 1, "tree.trees_per_prompt", "must be >= 1", "use 1")
    _check(t.max_batch >= 0, "tree.max_batch", "must be >= 0", "use 0 for no limit")
    if t.variant != "tree":
        _check(t.leaves_per_tree >= 2, "tree.group_size", "GRPO needs >= 2 trajectories per prompt", "use >= 2")
    if t.variant == "flat":
        _check(flat_train_count(t.num_steps, t.train_fraction, t.flat_steps) >= 1, "tree.train_fraction",
               f"{t.train_fraction} of {t.num_steps} steps trains no step under flat_steps={t.flat_steps}",
               "raise tree.train_fraction (DanceGRPO counts int((T-1)*f), Flow-GRPO int(T*f))")


def _validate_outputs(cfg: Config) -> None:
    out = cfg.tracking.output_dir
    _check(out.strip() != "", "tracking.output_dir", "is empty", "use e.g. outputs, /mnt/shared/outputs or s3://bucket/outputs")
    problem = storage.check_location(out)
    _check(problem is None, "tracking.output_dir", f"{out!r} {problem}", "use a local/NFS path or e.g. s3://bucket/prefix")
    _check(not storage.is_uri(out) or out.startswith("file://") or bool(cfg.tracking.mlflow_uri)
           or bool(os.environ.get("MLFLOW_TRACKING_URI")), "tracking.mlflow_uri",
           f"output_dir {out.split('?')[0]} is an object store, where the default MLflow store (a sqlite file beside "
           "the outputs) cannot live", "set tracking.mlflow_uri to a tracking server (http://...) or a local "
           "sqlite:////abs/path/mlflow.db, or set $MLFLOW_TRACKING_URI")


def groups_per_iteration(cfg: Config) -> int:
    """Trees (tree) or GRPO groups (flat/mix) one iteration grows: the batch arithmetic's root.
    Every count below, the samplers' chunking (actors/ray_system) and the expected NFE (driver)
    derive from it, and builders.build_sampler passes the same trees_per_prompt to the sampler."""
    return cfg.prompts_per_iteration * cfg.tree.trees_per_prompt


def leaves_per_iteration(cfg: Config) -> int:
    """Images one iteration generates and scores."""
    return groups_per_iteration(cfg) * cfg.tree.leaves_per_tree


def decisions_per_iteration(cfg: Config) -> int:
    """Training decisions one iteration produces (what the learner splits over workers)."""
    t = cfg.tree
    groups = groups_per_iteration(cfg)
    if t.variant == "tree":
        return groups * (t.k ** t.depth - 1) // (t.k - 1)
    per_traj = flat_train_count(t.num_steps, t.train_fraction, t.flat_steps) if t.variant == "flat" else t.depth
    return groups * t.leaves_per_tree * per_traj


def _validate_learner(cfg: Config) -> None:
    lr = cfg.learner
    for key in ("lr", "clip_eps", "temperature", "explode_factor"):
        v = getattr(lr, key)
        _check(math.isfinite(v) and v > 0, f"learner.{key}", f"{v} must be a finite number > 0", "see --help for typical values")
    for key in ("kl_beta", "grad_clip", "weight_decay"):
        v = getattr(lr, key)
        _check(math.isfinite(v) and v >= 0, f"learner.{key}", f"{v} must be a finite number >= 0", "use 0 to turn it off")
    _check(len(lr.betas) == 2 and all(0 <= b < 1 for b in lr.betas), "learner.betas", f"{lr.betas} is not two values in [0, 1)",
           "use [0.9, 0.999]")
    for key in ("workers", "minibatches", "epochs"):
        _check(getattr(lr, key) >= 1, f"learner.{key}", f"{getattr(lr, key)} must be >= 1", "use 1")
    _check(lr.micro_batch >= 0, "learner.micro_batch", f"{lr.micro_batch} must be >= 0", "use 0 for the whole minibatch")
    _check(lr.kl_form == "exact" or cfg.model.kind != "ddim" or lr.kl_beta == 0, "learner.kl_form",
           "flow_grpo is Flow-GRPO's flow-matching form; a DDIM model has only the exact step KL",
           "use learner.kl_form=exact")
    _check(lr.max_bad_updates >= 1, "learner.max_bad_updates", f"{lr.max_bad_updates} must be >= 1", "use 3")
    n, parts = decisions_per_iteration(cfg), lr.workers * lr.minibatches
    _check(n % parts == 0, "learner.workers x learner.minibatches",
           f"{n} decisions per iteration do not split evenly into workers x minibatches = {parts} "
           "(every DDP rank must take the same number of steps)",
           "change learner.workers/learner.minibatches or prompts_per_iteration so they divide the decision count")
    _check(lr.edge_baseline == "none" or cfg.tree.variant == "tree", "learner.edge_baseline",
           f"'parent' compares siblings, and tree.variant={cfg.tree.variant!r} has none (every advantage would be 0)",
           "use learner.edge_baseline=none for flat/mix")
    _check(lr.strategy == "ddp" or cfg.model.lora_rank == 0, "learner.strategy",
           "fsdp with LoRA: FSDP2 gathers one dtype per shard group, so the float32 adapters would need a float32 base "
           "(twice the memory of the bf16 base it shards); DDP keeps the bf16 base whole and all-reduces only the "
           "adapters' gradients (FLUX.1-dev's 23.8 GB base fits one 80 GB GPU)",
           "use learner.strategy=ddp with LoRA; fsdp is for full fine-tunes (model.lora_rank=0)")
    _check(lr.strategy == "ddp" or lr.kl_beta == 0, "learner.strategy",
           "fsdp with learner.kl_beta > 0: the full fine-tune's frozen reference denoiser is not sharded yet, so each "
           "worker would hold a whole copy beside its shards", "use learner.kl_beta=0 (the paper's setting) with fsdp")


def _validate_advantage(cfg: Config) -> None:
    a = cfg.advantage
    for key in ("eps", "clip"):
        v = getattr(a, key)
        _check(math.isfinite(v) and v > 0, f"advantage.{key}", f"{v} must be a finite number > 0",
               "see --help for typical values")
    for key in ("buffer", "min_count"):
        _check(getattr(a, key) >= 1, f"advantage.{key}", f"{getattr(a, key)} must be >= 1", "use 16 (DDPO's default)")
    _check(a.min_count <= a.buffer, "advantage.min_count",
           f"{a.min_count} is more than the {a.buffer} rewards a prompt keeps, so its own statistics are never used",
           "use advantage.min_count <= advantage.buffer")
    _check(a.stats == "group" or cfg.rewards.aggregate == "raw", "advantage.stats",
           "running statistics are kept of one combined reward per leaf", "use rewards.aggregate=raw")


def _validate_rewards(cfg: Config) -> None:
    terms = cfg.rewards.terms
    for m in cfg.eval_metrics:
        _check(m == "auto" or m in REWARD_KINDS, "eval_metrics", f"unknown reward kind {m!r}",
               f"use kinds from {', '.join(REWARD_KINDS)}, or [] for none")
        _check(m not in [t.name for t in terms], "eval_metrics", f"{m} is a training reward term already",
               "list only kinds the run does not train on")
    _check(len(terms) >= 1, "rewards.terms", "no reward terms", "name at least one, e.g. [{name: miniature}]")
    names = [t.name for t in terms]
    for i, t in enumerate(terms):
        _check(t.name in REWARD_KINDS, f"rewards.terms.{i}.name", f"unknown reward {t.name!r}",
               f"use one of {', '.join(REWARD_KINDS)}")
        _check(math.isfinite(t.weight), f"rewards.terms.{i}.weight", f"{t.weight} is not finite", "use a finite weight")
        _check(t.version in ("", "v2.0", "v2.1"), f"rewards.terms.{i}.version", f"{t.version!r} unknown", "use v2.1 or v2.0")
        for key in TERM_FILE_FIELDS + ("model_name", "version"):
            takes = REWARD_TAKES.get(t.name, ())
            _check(not getattr(t, key) or key in takes, f"rewards.terms.{i}.{key}",
                   f"reward {t.name!r} does not take {key} (it takes: {', '.join(takes) or 'only name and weight'})",
                   f"remove it, e.g. rewards.terms.{i}.{key}=''")
    _check(len(set(names)) == len(names), "rewards.terms", f"duplicate reward names {names}", "list each reward once")
    total = sum(t.weight for t in terms)
    _check(total > 0, "rewards.terms.*.weight", f"weights sum to {total}; the combined reward would be zero or inverted",
           "give the terms positive weights (e.g. 1.0, or 0.7 / 0.3)")
    _check(0 <= cfg.rewards.max_nonfinite_fraction < 1, "rewards.max_nonfinite_fraction", "must be in [0, 1)", "use 0.25")


def _validate_pools(cfg: Config) -> None:
    p = cfg.pools
    for key in ("samplers", "rewards"):
        _check(getattr(p, key) >= 1, f"pools.{key}", f"{getattr(p, key)} actors: each pool needs >= 1", "use 1 or more")
    for key in ("max_restarts", "max_task_retries"):
        _check(getattr(p, key) >= -1, f"pools.{key}", f"{getattr(p, key)} must be >= -1", "use -1 for unlimited, 0 for none")
    _check(p.lost_node_wait_s > 0, "pools.lost_node_wait_s", f"{p.lost_node_wait_s} must be > 0",
           "give the seconds a replacement node may take to join (a KubeRay pod: minutes)")
    _check(p.reward_chunk >= 0, "pools.reward_chunk", f"{p.reward_chunk} must be >= 0", "use 0 for one call per batch")
    _check(p.sampler_calls >= 1, "pools.sampler_calls", f"{p.sampler_calls} must be >= 1", "use 1, or 2-4 to overlap rewards")
    _check(p.reply_timeout_s > 0, "pools.reply_timeout_s", f"{p.reply_timeout_s} must be > 0",
           "give the seconds the slowest sampler call or update may take (default 1800)")
    for key, r in (("pools.sampler", p.sampler), ("pools.reward", p.reward), ("learner.resources", cfg.learner.resources)):
        for res in ("num_cpus", "num_gpus"):
            _check(getattr(r, res) >= 0, f"{key}.{res}", f"{getattr(r, res)} must be >= 0", "use e.g. num_cpus=1")
        for name, amount in r.resources.items():
            _check(amount > 0, f"{key}.resources.{name}", f"amount {amount} must be > 0", "remove it or use a positive amount")
    if cfg.model.device == "cuda":
        _check(p.sampler.num_gpus > 0 and cfg.learner.resources.num_gpus > 0, "model.device",
               "model.device=cuda but samplers or learner workers request no GPU",
               "set pools.sampler.num_gpus and learner.resources.num_gpus (e.g. 1)")
