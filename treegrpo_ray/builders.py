"""Config -> components (torchtune-style builders). The only place that reads the config tree
for the components; they themselves take flat arguments. No Ray here, so the same builders
assemble the in-process run and every actor of the distributed one (Acme's pattern)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from treegrpo_ray import miniature
from treegrpo_ray.config import Config, ConfigError, bundled_file
from treegrpo_ray.models.devices import resolve_device
from treegrpo_ray.rewards.kinds import TERM_FILE_FIELDS

MINIATURE_DIR = Path(miniature.ASSETS_DIR)
MINIATURE_PROMPTS = ("miniature", "miniature-all")


def pipeline_path(cfg: Config) -> str:
    """'miniature' -> the shipped pipeline directory; anything else is passed to from_pretrained."""
    return miniature.PIPELINE_DIR if cfg.model.pretrained == "miniature" else cfg.model.pretrained


def load_prompts(cfg: Config, split: str = "train") -> list[str]:
    """Prompts for training ('train'), evaluation ('eval': the first `eval_prompts` training
    prompts, scored at a fixed seed) or generalisation ('held_out': the miniature world's unseen
    prompt combinations; [] for a prompt file)."""
    if split not in ("train", "eval", "held_out"):
        raise ValueError(f"split must be 'train', 'eval' or 'held_out', got {split!r}")
    if cfg.prompts in MINIATURE_PROMPTS:
        from treegrpo_ray.miniature.world import demo_prompts, split_prompts
        train, held_out = split_prompts()
        if split == "held_out":
            return held_out
        prompts = demo_prompts() if cfg.prompts == "miniature" else train
    else:
        path = Path(bundled_file(cfg.prompts))  # configs/prompts/... also from a plain install
        if not path.is_file():
            raise ConfigError(f"prompts: prompt file {str(path)!r} does not exist; give a text file with one prompt "
                              "per line, or 'miniature' / 'miniature-all'")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if not prompts:
            raise ConfigError(f"prompts: prompt file {str(path)!r} holds no prompts; write one prompt per line")
        if split == "held_out":
            return []
    return prompts[: cfg.eval_prompts] if split == "eval" else prompts


def quiet_libraries(cfg: Config) -> None:
    """Unless tracking.verbose: no per-process model-loading bars or INFO chatter from diffusers,
    transformers and huggingface_hub (each sampler, reward and learner process loads a pipeline)."""
    if cfg.tracking.verbose:
        return
    import diffusers
    import transformers
    from huggingface_hub.utils import disable_progress_bars
    for lib in (diffusers, transformers):
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()
    disable_progress_bars()


def build_policy(cfg: Config, device: str | None = None):
    from treegrpo_ray.models.policy import DiffusionPolicy
    quiet_libraries(cfg)
    m = cfg.model
    return DiffusionPolicy.from_pretrained(
        pipeline_path(cfg), kind=m.kind, dtype=m.dtype, device=device or m.device,
        lora_rank=m.lora_rank, lora_alpha=m.lora_alpha or None, lora_targets=tuple(m.lora_targets),
        guidance_scale=m.guidance_scale, true_cfg_scale=m.true_cfg_scale, max_sequence_length=m.max_sequence_length,
        resolution=m.resolution, num_frames=m.num_frames or None)


def build_sampler(cfg: Config, policy):
    from treegrpo_ray.sampling.tree_sampler import TreeSampler
    t = cfg.tree
    return TreeSampler(policy, variant=t.variant, num_steps=t.num_steps, k=t.k, depth=t.depth,
                       noise_level=t.noise_level, group_size=t.leaves_per_tree, trees_per_prompt=t.trees_per_prompt,
                       train_fraction=t.train_fraction, flat_steps=t.flat_steps,
                       share_initial_noise=t.share_initial_noise, logprob_reduction=t.logprob_reduction,
                       max_batch=t.max_batch or None,
                       keep_means=cfg.max_staleness >= 1 and cfg.learner.stale_correction == "recenter")


def term_spec(t) -> dict:
    """A reward term's options for rewards.build_scorer: empty strings mean "the kind's default" and
    are not passed on."""
    return {k: getattr(t, k) for k in TERM_FILE_FIELDS + ("model_name", "version") if getattr(t, k)}


def build_reward_model(cfg: Config, device: str | None = None):
    from treegrpo_ray.rewards import build_reward_model as build
    quiet_libraries(cfg)
    specs = []
    for t in cfg.rewards.terms:
        specs.append(dict(name=t.name, weight=t.weight, **term_spec(t)))
    watched = eval_metrics(cfg)
    specs += [dict(name=m, weight=0.0) for m in watched]
    return build(specs, pipeline_path(cfg), device=device or resolve_device(cfg.model.device), eval_only=watched)


def eval_metrics(cfg: Config) -> list[str]:
    """The kinds evaluation scores beside the training terms (config `eval_metrics`, auto resolved)."""
    if "auto" in cfg.eval_metrics:
        return ["miniature_colour"] if cfg.prompts in MINIATURE_PROMPTS else []
    return list(cfg.eval_metrics)


def build_learner(cfg: Config, policy, *, module=None, rank: int = 0, world_size: int = 1):
    from treegrpo_ray.learning.learner import GRPOLearner
    lr = cfg.learner
    if lr.gradient_checkpointing:  # only where gradients flow: the sampler's no-grad forwards are unchanged
        policy.denoiser.enable_gradient_checkpointing()
    return GRPOLearner(policy, module=module, lr=lr.lr, weight_decay=lr.weight_decay, betas=lr.betas,
                       clip_eps=lr.clip_eps, weighting=lr.weighting, temperature=lr.temperature, baseline=lr.edge_baseline,
                       kl_beta=lr.kl_beta, kl_form=lr.kl_form,
                       grad_clip=lr.grad_clip, minibatches=lr.minibatches, epochs=lr.epochs,
                       micro_batch=lr.micro_batch, noise_level=cfg.tree.noise_level,
                       logprob_reduction=cfg.tree.logprob_reduction, max_bad_updates=lr.max_bad_updates,
                       explode_factor=lr.explode_factor, stale_correction=lr.stale_correction,
                       guidance_grad=lr.guidance_grad,
                       rank=rank, world_size=world_size, seed=cfg.seed)


def reward_weights(cfg: Config) -> dict[str, float]:
    return {t.name: t.weight for t in cfg.rewards.terms}


def set_worker_threads(num_cpus: float) -> None:
    """One intra-op thread per CPU the actor was given (2-core machines oversubscribe otherwise)."""
    n = max(1, int(num_cpus))
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))


def check_family(cfg: Config, pipeline_class: str | None) -> None:
    """The pipeline's class is a supported family, of model.kind, and takes the options set for it."""
    from treegrpo_ray.models.families import FAMILIES, SUPPORTED_PIPELINES
    family = next((f for f in FAMILIES if pipeline_class in f.pipeline_classes), None)
    if family is None:
        raise ConfigError(f"model.pretrained: {cfg.model.pretrained!r} is a {pipeline_class}; supported pipelines are "
                          f"{', '.join(SUPPORTED_PIPELINES)} (README, 'Model families')")
    if cfg.model.kind not in ("auto", family.kind):
        raise ConfigError(f"model.kind: {cfg.model.kind} but {cfg.model.pretrained!r} is a {pipeline_class} "
                          f"({family.kind}); use model.kind=auto")
    if family.kind == "ddim" and cfg.learner.kl_beta > 0 and cfg.learner.kl_form != "exact":
        raise ConfigError(f"learner.kl_form: {cfg.learner.kl_form} is Flow-GRPO's flow-matching form and "
                          f"{pipeline_class} is a DDIM model; use learner.kl_form=exact")
    if cfg.model.true_cfg_scale != 1 and family.__name__ not in ("FluxFamily", "QwenImageFamily"):
        raise ConfigError(f"model.true_cfg_scale: only FLUX and Qwen-Image take it, {pipeline_class} runs "
                          "classifier-free guidance with model.guidance_scale; leave model.true_cfg_scale=1")


def preflight(cfg: Config) -> None:
    """File-system checks that need no model load: run before any cluster is allocated."""
    prompts = load_prompts(cfg, "train")
    if "miniature_colour" in eval_metrics(cfg) + [t.name for t in cfg.rewards.terms]:
        from treegrpo_ray.miniature.world import parse_prompt
        try:
            for p in prompts:
                parse_prompt(p)
        except ValueError as e:
            raise ConfigError(f"miniature_colour scores the miniature world's prompts only ({e}); drop it from "
                              "eval_metrics / rewards.terms, or train on prompts=miniature") from None
    path = pipeline_path(cfg)
    looks_local = path.startswith(("/", "./", "../", "~"))  # anything else may be a hub id
    local = Path(path).expanduser()
    if cfg.model.pretrained == "miniature" and not Path(path, "model_index.json").is_file():
        raise ConfigError(f"model.pretrained: the shipped miniature pipeline is missing at {path}; reinstall the "
                          "package or rebuild it with `python -m tools.miniature.build`")
    if looks_local and not local.exists():
        raise ConfigError(f"model.pretrained: local directory {path!r} does not exist; point it at a diffusers "
                          "pipeline directory (with model_index.json) or a hub id")
    index = local / "model_index.json"
    if local.is_dir() and not index.is_file():
        raise ConfigError(f"model.pretrained: {path!r} has no model_index.json, so it is not a diffusers pipeline "
                          "directory (what `save_pretrained` writes: model_index.json beside transformer/, vae/, ...); "
                          "point it at that directory")
    if index.is_file():
        check_family(cfg, json.loads(index.read_text()).get("_class_name"))
    from treegrpo_ray.rewards.files import locate
    for i, term in enumerate(cfg.rewards.terms):
        for key in TERM_FILE_FIELDS:
            if getattr(term, key) and not Path(getattr(term, key)).expanduser().exists():
                raise ConfigError(f"rewards.terms.{i}.{key}: {getattr(term, key)!r} does not exist; download it "
                                  "first (see README, 'Rewards') or leave it empty to use the default location")
    checks = [(f"rewards.terms.{i}", t.name, {k: getattr(t, k) for k in TERM_FILE_FIELDS + ("version",)})
              for i, t in enumerate(cfg.rewards.terms)] + [("eval_metrics", m, {}) for m in eval_metrics(cfg)]
    for where, kind, files in checks:
        try:
            locate(kind, **files)
        except FileNotFoundError as e:
            raise ConfigError(f"{where} ({kind}): {e}") from None
