"""The config schema: one typed, frozen tree for every run, each field with its one-line doc and,
where it takes one of a few values, its `choices`, written beside it (`--help` prints them all).

Defaults describe the embedded miniature run; YAML files in `configs/` only override them, and
dotted `key=value` overrides on the command line override the YAML (`config.load`). Invariants
between fields are in `config.checks`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from treegrpo_ray.algo.advantages import STD_MODES
from treegrpo_ray.algo.loss import KL_FORMS, STALE_CORRECTIONS
from treegrpo_ray.algo.tree import FLAT_STEPS


class ConfigError(ValueError):
    """A config value is wrong; the message names the field and how to fix it."""


def doc(default: Any, help: str, *, choices: tuple[str, ...] | None = None, **kw) -> Any:
    """A dataclass field with a one-line doc (shown by --help) and, if given, its allowed values."""
    metadata = {"help": help} | ({"choices": tuple(choices)} if choices else {})
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda: _copy(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


def _copy(x):
    return dataclasses.replace(x) if dataclasses.is_dataclass(x) else type(x)(x)


@dataclass(frozen=True)
class ModelConfig:
    pretrained: str = doc("miniature", "diffusers pipeline: 'miniature' (shipped), a hub id or a local directory")
    kind: str = doc("auto", "auto (from the pipeline's class: SD3/SD3.5, FLUX.1, Qwen-Image and Wan2.1 are flow, "
                    "SD1.5 is ddim) | flow | ddim (insist on one; a pipeline of the other kind is an error)",
                    choices=("auto", "flow", "ddim"))
    dtype: str = doc("float32", "weights dtype of the trainable model: float32 | bfloat16 | float16",
                     choices=("float32", "bfloat16", "float16"))
    device: str = doc("auto", "auto (cuda if available) | cpu | cuda", choices=("auto", "cpu", "cuda"))
    resolution: int = doc(32, "image height = width in pixels (SD3.5-medium: 512)")
    guidance_scale: float = doc(4.5, "classifier-free guidance scale in sampler and learner (<= 1 disables CFG); "
                                "FLUX.1-dev: the distilled guidance embedding (no CFG batch); Qwen-Image ignores it")
    true_cfg_scale: float = doc(1.0, "FLUX and Qwen-Image: real classifier-free guidance with the empty "
                                "(Qwen-Image: ' ') negative prompt (> 1 doubles the batch); 1 = off")
    max_sequence_length: int = doc(16, "T5 tokens per prompt (SD3: up to 256; miniature: none); Qwen-Image: <= 1024")
    num_frames: int = doc(0, "video pipelines (Wan2.1) only: frames per clip, 4k + 1 (Wan: 81 = 5 s at 16 fps; "
                          "latent frames = (num_frames - 1) / 4 + 1); 0 = the pipeline's default (81). An image "
                          "pipeline refuses any value but 0")
    lora_rank: int = doc(0, "LoRA rank on the transformer; 0 = full fine-tune")
    lora_alpha: int = doc(0, "LoRA alpha; 0 = same as rank")
    lora_targets: tuple[str, ...] = doc(("to_q", "to_k", "to_v", "to_out.0"), "module names LoRA adapts")


@dataclass(frozen=True)
class TreeConfig:
    variant: str = doc("tree", "tree (TreeGRPO) | flat (DanceGRPO/Flow-GRPO) | mix (MixGRPO)",
                       choices=("tree", "flat", "mix"))
    num_steps: int = doc(10, "T, denoising steps per trajectory")
    k: int = doc(3, "branching factor: children per node inside the SDE window (tree)")
    depth: int = doc(3, "d, SDE window length in steps; tree has k**d leaves")
    window: str = doc("random", "window placement: random (paper) | sliding (authors' code)",
                      choices=("random", "sliding"))
    shift_every: int = doc(1, "sliding window: iterations between shifts (tau)")
    window_stride: int = doc(1, "sliding window: steps it moves per shift (MixGRPO's prog_overlap_step)")
    max_window_start: int = doc(-1, "last allowed window start; -1 = num_steps - depth")
    noise_level: float = doc(0.7, "eta, SDE noise level (Flow-GRPO form)")
    group_size: int = doc(0, "flat/mix: trajectories per prompt; 0 = k**depth (equal leaves to tree)")
    train_fraction: float = doc(0.6, "flat: fraction of the steps trained per trajectory (counted as flat_steps says)")
    flat_steps: str = doc("dancegrpo", "flat: which steps a trajectory trains: dancegrpo (int((T-1)*f) drawn per "
                          "trajectory from all but the last step) | flow_grpo (the int(T*f) leading steps; its "
                          "presets use f=0.99) | batch (round(T*f) of all T steps, one draw per batch)",
                          choices=FLAT_STEPS)
    share_initial_noise: bool = doc(False, "flat: all trajectories of a prompt start from the same noise")
    trees_per_prompt: int = doc(1, "trees (or groups) grown per prompt per iteration")
    logprob_reduction: str = doc("mean", "log-prob reduction over latent elements: mean (peers) | sum (exact density)",
                                 choices=("mean", "sum"))
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
    reply_timeout_s: float = doc(1800.0, "seconds the driver waits for the next sampler, reward or learner reply "
                                 "before it stops the run with a TimeoutError (Ray)")


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
    aggregate: str = doc("raw", "raw: normalise the weighted sum | advantage: normalise each reward, then weight",
                         choices=("raw", "advantage"))
    max_nonfinite_fraction: float = doc(0.25, "drop NaN/inf-scored leaves up to this fraction of an iteration, else fail")


@dataclass(frozen=True)
class AdvantageConfig:
    """How leaf rewards become leaf advantages (algo.advantages.leaf_advantages): the driver's
    stage, before the learner. The learner's own advantage settings (value propagation and the
    edge baseline) are under learner.*"""
    std: str = doc("prompt", "scale of centred leaf rewards: prompt (GRPO: per-prompt std) | batch (one batch-wide "
                   "std; prompts whose leaves all score alike stay small) | none", choices=STD_MODES)
    stats: str = doc("group", "reward baseline: group (GRPO: this iteration's leaves of the prompt) | running (DDPO: "
                     "the prompt's last `buffer` rewards over all iterations, the batch's while it has fewer than "
                     "`min_count`; replaces `std`; needs rewards.aggregate=raw)", choices=("group", "running"))
    buffer: int = doc(16, "running: rewards kept per prompt (DDPO: 16)")
    min_count: int = doc(16, "running: rewards a prompt needs before its own statistics are used (DDPO: 16)")
    eps: float = doc(1e-4, "epsilon added to the reward std (DDPO: 1e-6)")
    clip: float = doc(5.0, "clip normalised leaf advantages to +-clip")


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = doc(5e-5, "AdamW learning rate (the miniature default; GPU configs set their own)")
    weight_decay: float = doc(0.0, "AdamW weight decay")
    betas: tuple[float, ...] = doc((0.9, 0.999), "AdamW betas")
    clip_eps: float = doc(0.2, "PPO/GRPO ratio clip epsilon (authors' SD3.5 code: 1e-4)")
    weighting: str = doc("uniform", "value propagation: uniform (authors' code) | softmax (paper, by old log-prob)",
                         choices=("uniform", "softmax"))
    temperature: float = doc(1.0, "softmax weighting temperature")
    edge_baseline: str = doc("none", "edge advantage: none (paper: V(child)) | parent (V(child) - V(node): "
                             "each child against its siblings; tree variant only)", choices=("none", "parent"))
    kl_beta: float = doc(0.0, "weight of the KL-to-reference term (form: learner.kl_form); 0 = off")
    kl_form: str = doc("flow_grpo", "flow_grpo (Flow-GRPO's |dmu|^2 / (2 sigma_t^2): a beta from its configs means the "
                       "same here; flow families only) | exact (the Gaussian step KL |dmu|^2 / (2 s^2), s = sigma_t "
                       "sqrt(-dt): 1/(-dt) times larger, 7-112x at T=10)", choices=KL_FORMS)
    grad_clip: float = doc(1.0, "max gradient norm; 0 = no clipping")
    minibatches: int = doc(1, "optimizer steps per iteration (decisions split evenly)")
    epochs: int = doc(1, "passes over an iteration's decisions")
    micro_batch: int = doc(0, "decisions per forward/backward (gradient accumulation); 0 = whole minibatch")
    workers: int = doc(1, "Ray Train data-parallel learner workers")
    strategy: str = doc("ddp", "ddp | fsdp (FSDP2: a full fine-tune's weights, gradients and AdamW moments sharded "
                        "over learner.workers, float32 shards computing in model.dtype; NCCL on GPUs, gloo on CPU, "
                        "tested on CPU with 2 workers; not with LoRA or kl_beta > 0)", choices=("ddp", "fsdp"))
    gradient_checkpointing: bool = doc(False, "recompute the transformer's activations in backward (diffusers' "
                                       "enable_gradient_checkpointing): less learner memory, ~1 extra forward")
    resources: ResourcesConfig = doc(ResourcesConfig(num_cpus=2.0), "resources of each learner worker (num_cpus = "
                                     "its torch threads; 2 suits a laptop, where on-policy stages take turns)")
    stale_correction: str = doc("recenter", "trees older than the learner (max_staleness >= 1): recenter (move each "
                                "stale child by mu_prox - mu_tree, same noise, so it is the child the current weights "
                                "would have drawn; the sampler keeps its means; BENCHMARKS §10) | decoupled (decoupled "
                                "PPO: clip against the weights the update starts from, re-scored, and weight each edge "
                                "by pi_prox / pi_tree) | none (clip against the tree's own log-probs)",
                                choices=STALE_CORRECTIONS)
    guidance_grad: str = doc("both", "classifier-free guidance in the learner's forward: both (gradient through the "
                             "conditional and the unconditional output: ddpo-pytorch, DanceGRPO-SD, Flow-GRPO since "
                             "mid-2025) | cond (the unconditional output detached, as Flow-GRPO's July-2025 trainer)",
                             choices=("both", "cond"))
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
    mode: str = doc("ray", "ray (actors + Ray Train) | local (everything in this process, for debugging/tests)",
                    choices=("ray", "local"))
    ray_address: str = doc("", "Ray cluster address; '' = $RAY_ADDRESS, else start a local instance")
    ray_num_cpus: int = doc(0, "CPUs of a locally started Ray instance; 0 = all")
    model: ModelConfig = doc(ModelConfig(), "policy model")
    tree: TreeConfig = doc(TreeConfig(), "sampler shape and variant")
    rewards: RewardsConfig = doc(RewardsConfig(), "reward models and how they combine")
    advantage: AdvantageConfig = doc(AdvantageConfig(), "leaf rewards -> leaf advantages (the driver's stage)")
    learner: LearnerConfig = doc(LearnerConfig(), "GRPO update")
    pools: PoolsConfig = doc(PoolsConfig(), "sampler and reward actor pools")
    tracking: TrackingConfig = doc(TrackingConfig(), "MLflow and outputs")
    checkpoint: CheckpointConfig = doc(CheckpointConfig(), "checkpointing and resume")


def get_dotted(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, tuple) else getattr(cfg, part)
    return cfg


def choices(node: Any = None, prefix: str = "") -> dict[str, tuple[str, ...]]:
    """Every field that takes one of a few values: dotted key -> its choices (read off the defaults)."""
    node = Config() if node is None else node
    out = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if "choices" in f.metadata:
            out[prefix + f.name] = f.metadata["choices"]
        elif dataclasses.is_dataclass(value):
            out |= choices(value, f"{prefix}{f.name}.")
    return out
