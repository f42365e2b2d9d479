"""One typed config tree for every run.

Defaults here describe the embedded miniature run; YAML files in `configs/` only override them,
and `key=value` dotted overrides on the command line override the YAML. Unknown keys, wrong
types and violated invariants raise `ConfigError` at load time, naming the field and the fix,
before Ray, a GPU or a model is touched. `python -m treegrpo_ray.run --help` prints every field
with the one-line doc written next to it here.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from treegrpo_ray import storage
from treegrpo_ray.algo.tree import FLAT_STEPS, flat_train_count
from treegrpo_ray.config_parse import ConfigError, _build, _merge, _parse_scalar, _set_dotted
from treegrpo_ray.rewards.kinds import REWARD_KINDS, TERM_FILE_FIELDS
from treegrpo_ray.rewards.kinds import TAKES as REWARD_TAKES


def doc(default: Any, help: str, **kw) -> Any:
    """A dataclass field with a one-line doc (shown by --help)."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _copy(x):
    return dataclasses.replace(x) if dataclasses.is_dataclass(x) else type(x)(x)


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str = doc("miniature", "diffusers pipeline: 'miniature' (shipped), a hub id or a local directory")
    kind: str = doc("auto", "auto (from the pipeline's class: SD3/SD3.5, FLUX.1 and Wan2.1 are flow, SD1.5 is ddim) "
                    "| flow | ddim (insist on one; a pipeline of the other kind is an error)")
    dtype: str = doc("float32", "weights dtype of the trainable model: float32 | bfloat16 | float16")
    device: str = doc("auto", "auto (cuda if available) | cpu | cuda")
    resolution: int = doc(32, "image height = width in pixels (SD3.5-medium: 512)")
    guidance_scale: float = doc(4.5, "classifier-free guidance scale in sampler and learner (<= 1 disables CFG); "
                                "FLUX.1-dev: the distilled guidance embedding (no CFG batch)")
    true_cfg_scale: float = doc(1.0, "FLUX only: real classifier-free guidance with the empty negative prompt "
                                "(> 1 doubles the batch); 1 = off")
    max_sequence_length: int = doc(16, "T5 tokens per prompt (SD3: up to 256; miniature has no T5)")
    num_frames: int = doc(0, "video pipelines (Wan2.1) only: frames per clip, 4k + 1 (Wan: 81 = 5 s at 16 fps; "
                          "latent frames = (num_frames - 1) / 4 + 1); 0 = the pipeline's default (81). An image "
                          "pipeline refuses any value but 0")
    lora_rank: int = doc(0, "LoRA rank on the transformer; 0 = full fine-tune")
    lora_alpha: int = doc(0, "LoRA alpha; 0 = same as rank")
    lora_targets: tuple[str, ...] = doc(("to_q", "to_k", "to_v", "to_out.0"), "module names LoRA adapts")


@dataclass(frozen=True)
class TreeConfig:
    variant: str = doc("tree", "tree (TreeGRPO) | flat (DanceGRPO/Flow-GRPO) | mix (MixGRPO)")
    num_steps: int = doc(10, "T, denoising steps per trajectory")
    k: int = doc(3, "branching factor: children per node inside the SDE window (tree)")
    depth: int = doc(3, "d, SDE window length in steps; tree has k**d leaves")
    window: str = doc("random", "window placement: random (paper) | sliding (authors' code)")
    shift_every: int = doc(1, "sliding window: iterations between shifts (tau)")
    window_stride: int = doc(1, "sliding window: steps it moves per shift (MixGRPO's prog_overlap_step)")
    max_window_start: int = doc(-1, "last allowed window start; -1 = num_steps - depth")
    noise_level: float = doc(0.7, "eta, SDE noise level (Flow-GRPO form)")
    group_size: int = doc(0, "flat/mix: trajectories per prompt; 0 = k**depth (equal leaves to tree)")
    train_fraction: float = doc(0.6, "flat: fraction of the steps trained per trajectory (counted as flat_steps says)")
    flat_steps: str = doc("dancegrpo", "flat: which steps a trajectory trains: dancegrpo (int((T-1)*f) drawn per "
                          "trajectory from all but the last step) | flow_grpo (the int(T*f) leading steps; its "
                          "presets use f=0.99) | batch (round(T*f) of all T steps, one draw per batch)")
    share_initial_noise: bool = doc(False, "flat: all trajectories of a prompt start from the same noise")
    trees_per_prompt: int = doc(1, "trees (or groups) grown per prompt per iteration")
    logprob_reduction: str = doc("mean", "log-prob reduction over latent elements: mean (peers) | sum (exact density)")
    max_batch: int = doc(0, "max nodes per transformer call while sampling; 0 = no limit")

    @property
    def leaves_per_tree(self) -> int:
        return self.k ** self.depth if self.variant == "tree" else (self.group_size or self.k ** self.depth)


@dataclass(frozen=True)
class ResourcesConfig:
    num_cpus: float = doc(1.0, "CPUs per actor / learner worker")
    num_gpus: float = doc(0.0, "GPUs per actor / learner worker")
    resources: dict[str, float] = doc({}, "Ray custom resources per actor, e.g. {sampler_slot: 1} to pin a pool to its node group")
    label_selector: dict[str, str] = doc({}, "Ray node labels the actor must land on (Ray >= 2.49)")


@dataclass(frozen=True)
class PoolsConfig:
    samplers: int = doc(1, "sampler actors (grow trees)")
    rewards: int = doc(1, "reward actors (decode + score leaves)")
    sampler: ResourcesConfig = doc(ResourcesConfig(num_cpus=2.0), "resources of each sampler actor (num_cpus = its "
                                   "torch threads; 2 suits a laptop, where on-policy stages take turns)")
    reward: ResourcesConfig = doc(ResourcesConfig(), "resources of each reward actor")
    max_restarts: int = doc(3, "Ray restarts of a crashed sampler/reward actor (-1 = unlimited)")
    max_task_retries: int = doc(3, "retries of a call lost with its actor")
    lost_node_wait_s: float = doc(600.0, "how long a call (or the learner) whose actor's node was lost waits for Ray "
                                  "to restart it on a replacement node before the run stops (its checkpoints kept; "
                                  "checkpoint.resume=auto continues)")
    reward_chunk: int = doc(0, "leaves per reward call; 0 = one call per sampler batch")
    sampler_calls: int = doc(1, "calls per sampler per iteration, each growing its share of the sampler's prompts: "
                             "rewards of one call run while the next grows (Ray); 1 = one batch per sampler")


@dataclass(frozen=True)
class RewardTerm:
    name: str = doc("miniature", "scorer: miniature | miniature_colour | hpsv2 | clipscore | aesthetic | imagereward | "
                    "pickscore | jpeg_compressibility | jpeg_incompressibility")
    weight: float = doc(1.0, "weight in the combined reward")
    checkpoint: str = doc("", "checkpoint file or directory ('' = the scorer's default / HF cache)")
    model_name: str = doc("", "open_clip architecture for hpsv2/clipscore/aesthetic ('' = the kind's default: "
                          "ViT-H-14 for hpsv2, OpenAI's ViT-L-14-quickgelu for clipscore and aesthetic)")
    version: str = doc("", "hpsv2: v2.1 | v2.0 ('' = v2.1)")
    clip_checkpoint: str = doc("", "aesthetic: the CLIP ViT-L/14 (OpenAI) open_clip weights its head reads ('' = HF cache)")
    processor: str = doc("", "pickscore: the CLIP-ViT-H-14 processor directory; imagereward: bert-base-uncased's "
                         "tokenizer directory ('' = HF cache)")


@dataclass(frozen=True)
class RewardsConfig:
    terms: tuple[RewardTerm, ...] = doc((RewardTerm(),), "reward terms; YAML list of {name, weight, checkpoint, ...}")
    aggregate: str = doc("raw", "raw: normalise the weighted sum | advantage: normalise each reward, then weight")
    max_nonfinite_fraction: float = doc(0.25, "drop NaN/inf-scored leaves up to this fraction of an iteration, else fail")


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = doc(5e-5, "AdamW learning rate (the miniature default; GPU configs set their own)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: tuple[float, ...] = doc((0.9, 0.999), "AdamW betas")
    clip_eps: float = doc(0.2, "PPO/GRPO ratio clip epsilon (authors' SD3.5 code: 1e-4)")
    adv_std: str = doc("prompt", "scale of centred leaf rewards: prompt (GRPO: per-prompt std) | batch (one "
                       "batch-wide std; prompts whose leaves all score alike stay small) | none")
    adv_stats: str = doc("group", "reward baseline: group (GRPO: this iteration's leaves of the prompt) | running "
                         "(DDPO: the prompt's last adv_buffer rewards over all iterations, the batch's while it "
                         "has fewer than adv_min_count; replaces adv_std; needs rewards.aggregate=raw)")
    adv_buffer: int = doc(16, "running: rewards kept per prompt (DDPO: 16)")
    adv_min_count: int = doc(16, "running: rewards a prompt needs before its own statistics are used (DDPO: 16)")
    adv_eps: float = doc(1e-4, "epsilon added to the reward std (DDPO: 1e-6)")
    adv_clip: float = doc(5.0, "clip normalised leaf advantages to +-adv_clip")
    weighting: str = doc("uniform", "value propagation: uniform (authors' code) | softmax (paper, by old log-prob)")
    temperature: float = doc(1.0, "softmax weighting temperature")
    edge_baseline: str = doc("none", "edge advantage: none (paper: V(child)) | parent (V(child) - V(node): "
                             "each child against its siblings; tree variant only)")
    kl_beta: float = doc(0.0, "weight of the KL-to-reference term (form: learner.kl_form); 0 = off")
    kl_form: str = doc("flow_grpo", "flow_grpo (Flow-GRPO's |dmu|^2 / (2 sigma_t^2): a beta from its configs means the "
                       "same here; flow families only) | exact (the Gaussian step KL |dmu|^2 / (2 s^2), s = sigma_t "
                       "sqrt(-dt): 1/(-dt) times larger, 7-112x at T=10)")
    grad_clip: float = doc(1.0, "max gradient norm; 0 = no clipping")
    minibatches: int = doc(1, "optimizer steps per iteration (decisions split evenly)")
    epochs: int = doc(1, "passes over an iteration's decisions")
    micro_batch: int = doc(0, "decisions per forward/backward (gradient accumulation); 0 = whole minibatch")
    workers: int = doc(1, "Ray Train data-parallel learner workers")
    strategy: str = doc("ddp", "ddp | fsdp (FSDP2: a full fine-tune's weights, gradients and AdamW moments sharded "
                        "over learner.workers, float32 shards computing in model.dtype; NCCL on GPUs, gloo on CPU, "
                        "tested on CPU with 2 workers; not with LoRA or kl_beta > 0)")
    gradient_checkpointing: bool = doc(False, "recompute the transformer's activations in backward (diffusers' "
                                       "enable_gradient_checkpointing): less learner memory, ~1 extra forward")
    resources: ResourcesConfig = doc(ResourcesConfig(num_cpus=2.0), "resources of each learner worker (num_cpus = "
                                     "its torch threads; 2 suits a laptop, where on-policy stages take turns)")
    stale_correction: str = doc("recenter", "trees older than the learner (max_staleness >= 1): recenter (move each "
                                "stale child by mu_prox - mu_tree, same noise, so it is the child the current weights "
                                "would have drawn; the sampler keeps its means; BENCHMARKS §10) | decoupled (decoupled "
                                "PPO: clip against the weights the update starts from, re-scored, and weight each edge "
                                "by pi_prox / pi_tree) | none (clip against the tree's own log-probs)")
    cfg_grad: str = doc("both", "CFG in the learner's forward: both (gradient through the conditional and the "
                        "unconditional output: ddpo-pytorch, DanceGRPO-SD, Flow-GRPO since mid-2025) | cond "
                        "(the unconditional output detached, as Flow-GRPO's July-2025 trainer)")
    max_bad_updates: int = doc(3, "consecutive skipped (non-finite / exploding) updates before the run stops")
    explode_factor: float = doc(100.0, "an update whose grad norm exceeds this x the running median is skipped")


@dataclass(frozen=True)
class TrackingConfig:
    mlflow_uri: str = doc("", "MLflow tracking URI; '' = $MLFLOW_TRACKING_URI or sqlite in output_dir")
    experiment: str = doc("treegrpo", "MLflow experiment name")
    run_name: str = doc("", "MLflow run name; '' = generated")
    output_dir: str = doc("outputs", "root of run outputs (checkpoints, export, config.json, MLflow db): a path "
                          "(relative: to the cwd; under `ray job submit`: to ~/treegrpo_ray) or a URI such as "
                          "s3://bucket/prefix (needs tracking.mlflow_uri)")
    sample_grid_every: int = doc(10, "log a sample grid image every N iterations; 0 = never")
    progress: bool = doc(True, "print one progress line per iteration")
    verbose: bool = doc(False, "also stream every actor's and library's own output (Ray worker logs, model "
                        "loading bars, INFO lines); off: our lines, warnings and errors only")


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = doc(10, "save a checkpoint every N iterations; 0 = only at the end")
    keep: int = doc(2, "checkpoints kept on disk (older ones are deleted after a newer one is complete)")
    resume: str = doc("", "'' = fresh run | 'latest' = newest complete checkpoint (error if none) | 'auto' = "
                      "latest if there is one, else fresh (for preemptible jobs) | a checkpoint dir")
    preempt_grace_s: float = doc(30.0, "seconds a stop signal (SIGTERM/SIGINT: a preempted pod, ray job stop) "
                                 "leaves before SIGKILL (Kubernetes' terminationGracePeriodSeconds): the driver warns "
                                 "when finishing the update in flight and the checkpoint took longer")


@dataclass(frozen=True)
class Config:
    seed: int = doc(0, "seed for noise, windows and init; same seed -> same run")
    iterations: int = doc(48, "training iterations (sample -> score -> update)")
    prompts: str = doc("miniature", "'miniature' (16 fixed prompts of the world's training split), 'miniature-all' "
                       "(all 120) or a text file, one prompt per line")
    prompts_per_iteration: int = doc(8, "prompts per iteration, split evenly over samplers")
    eval_every: int = doc(12, "evaluate every N iterations (ODE, fixed seed) on training prompts and, for the "
                          "miniature, its held-out prompts; 0 = never")
    eval_prompts: int = doc(16, "training prompts per evaluation (the first N)")
    eval_images_per_prompt: int = doc(2, "ODE samples per prompt per evaluation (each from its own noise)")
    eval_metrics: tuple[str, ...] = doc(("auto",), "reward kinds each evaluation also scores but the run does not "
                                        "train on (eval/<kind>): the run warns when its reward rises while one of "
                                        "these falls (drift.py). auto = miniature_colour for the miniature's "
                                        "prompts, none otherwise; [] = none")
    max_staleness: int = doc(0, "accept trees grown by weights at most this many versions old; 0 = on-policy")
    mode: str = doc("ray", "ray (actors + Ray Train) | local (everything in this process, for debugging/tests)")
    ray_address: str = doc("", "Ray cluster address; '' = $RAY_ADDRESS, else start a local instance")
    ray_num_cpus: int = doc(0, "CPUs of a locally started Ray instance; 0 = all")
    model: ModelConfig = doc(ModelConfig(), "policy model")
    tree: TreeConfig = doc(TreeConfig(), "sampler shape and variant")
    rewards: RewardsConfig = doc(RewardsConfig(), "reward models and how they combine")
    learner: LearnerConfig = doc(LearnerConfig(), "GRPO update")
    pools: PoolsConfig = doc(PoolsConfig(), "sampler and reward actor pools")
    tracking: TrackingConfig = doc(TrackingConfig(), "MLflow and outputs")
    checkpoint: CheckpointConfig = doc(CheckpointConfig(), "checkpointing and resume")


_CHOICES = {
    "model.kind": ("auto", "flow", "ddim"), "model.dtype": ("float32", "bfloat16", "float16"),
    "model.device": ("auto", "cpu", "cuda"), "tree.variant": ("tree", "flat", "mix"),
    "tree.window": ("random", "sliding"), "tree.logprob_reduction": ("mean", "sum"),
    "tree.flat_steps": FLAT_STEPS,
    "rewards.aggregate": ("raw", "advantage"), "learner.weighting": ("uniform", "softmax"),
    "learner.adv_std": ("prompt", "batch", "none"), "learner.edge_baseline": ("none", "parent"),
    "learner.cfg_grad": ("both", "cond"), "learner.adv_stats": ("group", "running"),
    "learner.strategy": ("ddp", "fsdp"), "mode": ("ray", "local"),
}


# ----------------------------------------------------------------------------- loading

BUNDLED = Path(__file__).parent / "configs"  # the named configs, shipped in the package (`configs/` links here)


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.yaml"))


def find_config(path: str | Path) -> Path:
    """A YAML file by path, else by name among the shipped configs: `sd35m_hps`, `sd35m_hps.yaml`
    and `configs/sd35m_hps.yaml` all find it from any directory, in an editable or a plain install."""
    p = Path(path)
    if p.is_file():
        return p
    name = p.name[:-5] if p.name.endswith(".yaml") else p.name
    if p.parent in (Path("."), Path("configs")) and (BUNDLED / f"{name}.yaml").is_file():
        return BUNDLED / f"{name}.yaml"
    raise ConfigError(f"--config: {str(path)!r} does not exist, as a YAML file or as the name of a shipped config; pass an "
                      f"existing file or one of: {', '.join(bundled_names())}")


def bundled_file(path: str) -> str:
    """A relative `configs/...` data path (e.g. a config's prompt file) that is not in the cwd
    resolves to the shipped copy; anything else is returned unchanged."""
    p = Path(path)
    if not p.is_absolute() and not p.exists() and p.parts[:1] == ("configs",) and (BUNDLED.joinpath(*p.parts[1:])).exists():
        return str(BUNDLED.joinpath(*p.parts[1:]))
    return path


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- dotted `key=value` overrides; then type-check and validate."""
    raw: dict = to_dict(Config())  # start from the defaults so list items can be overridden by index
    if path is not None:
        p = find_config(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(p)!r} must hold a mapping of keys, got {type(loaded).__name__}")
        raw = _merge(raw, loaded)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key=value, e.g. tree.k=3")
        _set_dotted(raw, key.strip(), _parse_scalar(value.strip()))
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- invariants

def _check(ok: bool, key: str, problem: str, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {problem}; {fix}")


def validate(cfg: Config) -> Config:
    """Every cross-field invariant, in one place. Raises ConfigError naming the field and fix."""
    for key, allowed in _CHOICES.items():
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
    for key in ("lr", "clip_eps", "adv_eps", "adv_clip", "temperature", "explode_factor"):
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
    _check(lr.kl_form in ("flow_grpo", "exact"), "learner.kl_form", f"{lr.kl_form!r} is not flow_grpo | exact",
           "use flow_grpo (Flow-GRPO's beta scale) or exact")
    _check(lr.kl_form == "exact" or cfg.model.kind != "ddim" or lr.kl_beta == 0, "learner.kl_form",
           "flow_grpo is Flow-GRPO's flow-matching form; a DDIM model has only the exact step KL",
           "use learner.kl_form=exact")
    _check(lr.stale_correction in ("decoupled", "recenter", "none"), "learner.stale_correction",
           f"{lr.stale_correction!r} is not recenter | decoupled | none", "use recenter")
    for key in ("adv_buffer", "adv_min_count"):
        _check(getattr(lr, key) >= 1, f"learner.{key}", f"{getattr(lr, key)} must be >= 1", "use 16 (DDPO's default)")
    _check(lr.adv_min_count <= lr.adv_buffer, "learner.adv_min_count",
           f"{lr.adv_min_count} is more than the {lr.adv_buffer} rewards a prompt keeps, so its own statistics "
           "are never used",
           "use learner.adv_min_count <= learner.adv_buffer")
    _check(lr.adv_stats == "group" or cfg.rewards.aggregate == "raw", "learner.adv_stats",
           "running statistics are kept of one combined reward per leaf", "use rewards.aggregate=raw")
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
    for key, r in (("pools.sampler", p.sampler), ("pools.reward", p.reward), ("learner.resources", cfg.learner.resources)):
        for res in ("num_cpus", "num_gpus"):
            _check(getattr(r, res) >= 0, f"{key}.{res}", f"{getattr(r, res)} must be >= 0", "use e.g. num_cpus=1")
        for name, amount in r.resources.items():
            _check(amount > 0, f"{key}.resources.{name}", f"amount {amount} must be > 0", "remove it or use a positive amount")
    if cfg.model.device == "cuda":
        _check(p.sampler.num_gpus > 0 and cfg.learner.resources.num_gpus > 0, "model.device",
               "model.device=cuda but samplers or learner workers request no GPU",
               "set pools.sampler.num_gpus and learner.resources.num_gpus (e.g. 1)")


# ----------------------------------------------------------------------------- helpers

def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, tuple) else getattr(cfg, part)
    return cfg


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list version (YAML/JSON-serialisable)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


_SECRET_WORDS = ("token", "password", "secret", "api_key", "apikey", "credential")


def flatten(cfg: Config, *, redact: bool = True) -> dict[str, str]:
    """`a.b.c -> str(value)` for MLflow params; values of secret-looking keys become '***', and
    credentials inside URIs (user:pass@host, ?secret_key=...) are masked (storage.redact)."""
    out: dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, list) and node and isinstance(node[0], dict):
            for i, v in enumerate(node):
                walk(v, f"{prefix}{i}.")
        else:
            key = prefix.rstrip(".")
            text = str(node)
            if redact:
                text = "***" if any(w in key.lower() for w in _SECRET_WORDS) else storage.redact(text)
            out[key] = text

    walk(to_dict(cfg), "")
    return out



def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per field: `key (type) = default  -- doc`, for --help."""
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{prefix}{f.name}.*  -- {f.metadata.get('help', '')}")
            lines += describe(type(value), f"{prefix}{f.name}.")
        else:
            lines.append(f"{prefix}{f.name} = {to_dict(value)!r}  -- {f.metadata.get('help', '')}")
    return lines


def from_dict(raw: dict) -> Config:
    """Rebuild a Config from `to_dict` output (how actors receive it), re-validated."""
    return validate(_build(Config, raw, ""))
