"""`python -m treegrpo_ray.run --plan`: what each pool holds per GPU, before anything is allocated.

No weights are read: parameter counts come from the pipeline's config files (plan.facts). Per
pool and per actor/worker, in the dtypes the run uses:

  sampler  denoiser + text encoders (model.dtype) + one no-grad forward of the largest batch the
           sampler sends (tree.max_batch, else a whole sampler chunk of leaves), doubled by CFG
  reward   VAE + scorers (float32, what the reward actors load) + one decode chunk of 16 images
  learner  denoiser + text encoders (+ a frozen reference copy for full fine-tune with KL);
           trainable tensors' gradients and AdamW's two moments in float32 (LoRA adapters are
           float32; a bf16/fp16 full fine-tune adds float32 master weights, whose gradients are
           float32 beside the model's own bf16 ones: learning/learner.py);
           FSDP2 (learner.strategy=fsdp) holds float32 shards as the masters, gathers two blocks
           at a time in model.dtype, shards gradients and moments; activations of
           one micro-batch (x2 rows with CFG), with or without gradient checkpointing
  all      on a GPU, CUDA context + allocator slack (CUDA_RESERVE)
  sync     bytes per weights version and its time per iteration at stated bandwidths (sync_lines)

Activations are modelled per row as a constant x (tokens x width) elements per block (a UNet:
per layer of a level, x latent pixels x sum_i channels_i / 4^i over its levels). No tokens^2
term: PyTorch's scaled_dot_product_attention keeps no softmax matrix with its flash kernels, on
CPU as on GPU (the calibration fit gives that term a coefficient of 0). The constants are fitted
on the tiny pipelines of each family on CPU by `python -m tools.plan_calibrate` (slope over
several batch sizes and resolutions; the fixed per-process part is left to CUDA_RESERVE), and
tests/test_plan.py holds the learner estimate against measured peaks at other shapes. A pool
whose total exceeds its share of a GPU (gpu_gib x num_gpus, num_gpus <= 1) makes the plan
refuse, naming the fix.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from treegrpo_ray.config import (ConfigError, Config, decisions_per_iteration, groups_per_iteration,
                                 leaves_per_iteration)
from treegrpo_ray.plan.facts import ModelFacts, model_facts, reward_facts
from treegrpo_ray.rewards.video import VIDEO_REWARD_FRAMES

GiB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CUDA_RESERVE = int(1.5 * GiB)   # CUDA context (~0.5 GiB) + caching-allocator fragmentation
DECODE_CHUNK = 16               # rewards/decode.LatentDecoder's batch_size
# Activation elements per row, in units of (tokens x width), see the module docstring. "grad": a
# step's peak without checkpointing, per block; "ckpt": kept per block with checkpointing (the block
# inputs); "recompute": what a checkpointed step adds at its peak (a block recomputed, its backward);
# "nograd": one no-grad forward's peak. Fitted by `python -m tools.plan_calibrate` (BENCHMARKS.md §8).
ACTIVATIONS = {"sd3": {"grad": 35.6, "ckpt": 2.5, "recompute": 33.6, "nograd": 12.2},
               "flux": {"grad": 27.6, "ckpt": 3.1, "recompute": 25.4, "nograd": 15.1},
               "sd15": {"grad": 105.8, "ckpt": 13.3, "recompute": 23.2, "nograd": 8.5},
               "qwenimage": {"grad": 29.7, "ckpt": 3.1, "recompute": 26.5, "nograd": 14.9},  # fitted 2026-12-07
               # Wan: tokens = latent frames x (h/2) x (w/2) (frames x tokens); fitted 2026-12-07 on the
               # tiny Wan (ffn 6x width, Wan2.1's is 5.83x) at 128/256 px x 9 frames, 16/48 rows
               "wan": {"grad": 38.8, "ckpt": 3.0, "recompute": 37.8, "nograd": 15.9}}
# decode peak per image, in units of (H x W x vae_channels x 4 bytes); fitted on the real SD VAE structure
VAE_DECODE = 5.9


@dataclass
class PoolPlan:
    name: str
    actors: int                          # actors (sampler/reward) or workers (learner)
    num_gpus: float                      # per actor; 0 = CPU
    items: list[tuple[str, int]] = field(default_factory=list)   # (what, bytes per actor)
    work: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(b for _, b in self.items)


@dataclass
class Plan:
    model: ModelFacts
    pools: list[PoolPlan]
    gpu_gib: float
    problems: list[str]
    sync: list[str] = field(default_factory=list)


# Weight sync (actors/weight_store.py: rank 0 streams buckets into its node's object store, each
# sampler node pulls them once, each sampler copies them to its GPU). Stated bandwidths, GB/s:
PCIE_GBPS = 20.0       # assumption: PCIe Gen4 x16 device <-> host, effective (D2H on the learner, H2D per sampler)
MEMCPY_GBPS = 10.0     # assumption: host memcpy into the object store (the one copy a version costs)
NETWORK_GBPS = 12.5    # assumption: 100 Gb/s between nodes, the learner node's link shared by the sampler nodes
MEASURED_GBPS = 1.45   # measured here (CPU, one node, 1 GB to 1 sampler end to end: 0.689 s): BENCHMARKS.md §15


def sync_lines(cfg: Config, m: ModelFacts) -> list[str]:
    """Bytes per weights version and the sync time per iteration at the stated bandwidths."""
    lora = cfg.model.lora_rank > 0
    nbytes = m.lora_params * 4 if lora else m.denoiser_params * DTYPE_BYTES[cfg.model.dtype]
    what = "LoRA adapters, float32" if lora else f"whole denoiser, {cfg.model.dtype}"
    gb, n = nbytes / 1e9, cfg.pools.samplers
    local = gb / PCIE_GBPS + 2 * gb / MEMCPY_GBPS + gb / PCIE_GBPS
    spread = local + (n + 1) * gb / NETWORK_GBPS
    lines = [f"weight sync: {gb:.3f} GB per version ({what}), one version per iteration",
             f"  {local:6.2f} s  all on one node: D2H {gb:.2f}/{PCIE_GBPS:g} + into the object store twice (rank 0, "
             f"then the weight store) 2 x {gb:.2f}/{MEMCPY_GBPS:g} + H2D {gb:.2f}/{PCIE_GBPS:g} (samplers in parallel)",
             f"  {spread:6.2f} s  learner, weight store and each of the {n} samplers on its own node: + {n + 1} x "
             f"{gb:.2f}/{NETWORK_GBPS:g} (learner -> store's node -> each sampler node, one link at a time)"]
    if MEASURED_GBPS:
        lines.append(f"  {gb / MEASURED_GBPS:6.2f} s  at this project's CPU machine's measured {MEASURED_GBPS:g} GB/s "
                     "end to end (BENCHMARKS.md §15)")
    lines.append(f"  (assumed: PCIe {PCIE_GBPS:g} GB/s, host memcpy {MEMCPY_GBPS:g} GB/s, network {NETWORK_GBPS:g} GB/s)")
    return lines


def latent_frames(cfg: Config, m: ModelFacts) -> int:
    """Latent frames of one row: 1 for images; video (Wan) (num_frames - 1) / temporal + 1."""
    if not m.vae_scale_factor_temporal:
        return 1
    from treegrpo_ray.models.families.wan import DEFAULT_NUM_FRAMES
    return ((cfg.model.num_frames or DEFAULT_NUM_FRAMES) - 1) // m.vae_scale_factor_temporal + 1


def row_tokens(cfg: Config, m: ModelFacts) -> tuple[int, int]:
    """(image tokens, text tokens) of one denoiser row; for a UNet, (latent pixels, CLIP tokens);
    for video, image tokens are latent frames x tokens per frame (frames x tokens)."""
    side = cfg.model.resolution // m.vae_scale_factor
    image = latent_frames(cfg, m) * (side // m.token_patch) ** 2
    if m.family == "sd3":
        text = m.clip_tokens + cfg.model.max_sequence_length
    elif m.family in ("flux", "qwenimage", "wan"):
        text = cfg.model.max_sequence_length  # Qwen-Image: the upper bound (a batch runs its longest prompt)
    else:
        text = m.clip_tokens
    return image, text


def _cfg_rows(cfg: Config, m: ModelFacts) -> int:
    """Rows per latent in a denoiser call: 2 with classifier-free guidance (cond + uncond)."""
    if m.family in ("flux", "qwenimage"):
        return 2 if cfg.model.true_cfg_scale > 1 else 1
    return 2 if cfg.model.guidance_scale > 1 else 1


def activation_unit(cfg: Config, m: ModelFacts) -> int:
    """Bytes of one (tokens x width) tensor of one row, in model.dtype: the unit ACTIVATIONS counts in."""
    image, text = row_tokens(cfg, m)
    tokens = image if m.family in ("sd15", "wan") else image + text  # Wan: text only as cross-attention K/V
    return tokens * m.width * DTYPE_BYTES[cfg.model.dtype]


def learner_activations(cfg: Config, m: ModelFacts, rows: int) -> int:
    c, unit = ACTIVATIONS[m.family], activation_unit(cfg, m)
    if cfg.learner.gradient_checkpointing:
        return int(rows * (c["ckpt"] * m.layers + c["recompute"]) * unit)
    return int(rows * c["grad"] * m.layers * unit)


def sampler_activations(cfg: Config, m: ModelFacts, rows: int) -> int:
    return int(rows * ACTIVATIONS[m.family]["nograd"] * activation_unit(cfg, m))


def learner_rows(cfg: Config, m: ModelFacts) -> int:
    """Denoiser rows of one learner forward: a micro-batch of decisions (x2 with CFG)."""
    lr = cfg.learner
    per_step = decisions_per_iteration(cfg) // (lr.workers * lr.minibatches)
    return min(lr.micro_batch or per_step, per_step) * _cfg_rows(cfg, m)


def sampler_rows(cfg: Config, m: ModelFacts) -> int:
    per_call = groups_per_iteration(cfg) // (cfg.pools.samplers * cfg.pools.sampler_calls) * cfg.tree.leaves_per_tree
    rows = min(cfg.tree.max_batch, per_call) if cfg.tree.max_batch else per_call
    return rows * _cfg_rows(cfg, m)


def nfe_range(cfg: Config) -> tuple[int, int]:
    """Denoiser calls per iteration (a CFG pair counts as one), over the window's possible starts."""
    from treegrpo_ray.algo.tree import count_nfe, count_nfe_flat
    t, groups = cfg.tree, groups_per_iteration(cfg)
    if t.variant != "tree":
        n = groups * count_nfe_flat(t.num_steps, t.leaves_per_tree)
        return n, n
    last = t.max_window_start if t.max_window_start >= 0 else t.num_steps - t.depth
    counts = [groups * count_nfe(t.num_steps, t.k, t.depth, p) for p in range(last + 1)]
    return min(counts), max(counts)


def sampler_pool(cfg: Config, m: ModelFacts) -> PoolPlan:
    b, encoders = DTYPE_BYTES[cfg.model.dtype], sum(n for _, n in m.text_encoders)
    pool = PoolPlan("sampler", cfg.pools.samplers, cfg.pools.sampler.num_gpus)
    rows = sampler_rows(cfg, m)
    pool.items += [(f"denoiser weights ({m.denoiser_params / 1e9:.2f} B params, {cfg.model.dtype})",
                    m.denoiser_params * b),
                   (f"text encoders ({encoders / 1e9:.2f} B params)", encoders * b),
                   (f"activations: no-grad forward of {rows} rows", sampler_activations(cfg, m, rows))]
    lo, hi = nfe_range(cfg)
    pool.work.append(f"{leaves_per_iteration(cfg)} leaves/iteration; denoiser calls/iteration "
                     f"{lo if lo == hi else f'{lo}-{hi} (window start)'} over {cfg.pools.samplers} samplers")
    return pool


def reward_pool(cfg: Config, m: ModelFacts) -> PoolPlan:
    pool = PoolPlan("reward", cfg.pools.rewards, cfg.pools.reward.num_gpus)
    scorers = [(t.name, reward_facts(t.name, t.model_name, t.checkpoint).params) for t in cfg.rewards.terms]
    from treegrpo_ray.builders import eval_metrics  # scored at evaluations only, but loaded with the actor
    scorers += [(f"{m} (eval only)", reward_facts(m).params) for m in eval_metrics(cfg)]
    pool.items.append((f"VAE ({m.vae_params / 1e6:.0f} M params, float32)", m.vae_params * 4))
    pool.items += [(f"scorer {n} ({p / 1e6:.0f} M params, float32)", p * 4) for n, p in scorers]
    pixels = cfg.model.resolution ** 2
    if m.vae_scale_factor_temporal:  # video: one clip per decode call (rewards/decode.VideoLatentDecoder)
        frames = (latent_frames(cfg, m) - 1) * m.vae_scale_factor_temporal + 1
        pool.items.append((f"activations: decode 1 clip of {frames} frames at {cfg.model.resolution}px "
                           f"(+ the clip, float32)", video_decode_bytes(cfg, m, frames)))
        pool.work.append(f"{leaves_per_iteration(cfg)} clips decoded per iteration, {VIDEO_REWARD_FRAMES} frames "
                         f"of each scored, over {cfg.pools.rewards} actors")
        return pool
    chunk = min(DECODE_CHUNK, cfg.pools.reward_chunk or DECODE_CHUNK)
    pool.items.append((f"activations: decode {chunk} images at {cfg.model.resolution}px",
                       int(chunk * VAE_DECODE * pixels * m.vae_channels * 4)))
    pool.work.append(f"{leaves_per_iteration(cfg)} images decoded + scored per iteration over "
                     f"{cfg.pools.rewards} actors")
    return pool


def video_decode_bytes(cfg: Config, m: ModelFacts, frames: int) -> int:
    """Wan's VAE decodes a clip causally, one latent frame (-> `temporal` frames) at a time with a
    cache of the previous frame's features: its peak is taken as VAE_DECODE per output frame of
    one latent frame's worth (not calibrated on the Wan VAE: the SD VAE's constant), plus the
    decoded clip itself (frames x 3 x H x W float32, kept whole for scoring)."""
    pixels = cfg.model.resolution ** 2
    return int(m.vae_scale_factor_temporal * VAE_DECODE * pixels * m.vae_channels * 4 + frames * 3 * pixels * 4)


def learner_pool(cfg: Config, m: ModelFacts) -> PoolPlan:
    lr, b, encoders = cfg.learner, DTYPE_BYTES[cfg.model.dtype], sum(n for _, n in m.text_encoders)
    pool = PoolPlan("learner", lr.workers, lr.resources.num_gpus)
    fsdp = lr.strategy == "fsdp"
    shard = lr.workers if fsdp else 1
    lora = cfg.model.lora_rank > 0
    trainable = m.lora_params if lora else m.denoiser_params
    masters = not lora and b != 4 and not fsdp  # FSDP2: the float32 shards are the masters
    tb = 4 + (b if masters else 0)      # float32 gradients (+ the model's own bf16 ones under masters)
    how = f"/{shard} (FSDP)" if shard > 1 else ""
    if fsdp:  # float32 shards; each block is gathered in model.dtype for its forward/backward (and the next prefetched)
        pool.items += [(f"denoiser weights, float32 shards{how}", m.denoiser_params * 4 // shard),
                       (f"2 gathered blocks in {cfg.model.dtype} (the running one + the prefetched)",
                        2 * m.denoiser_params // max(m.layers, 1) * b)]
    else:
        pool.items.append((f"denoiser weights{how}", m.denoiser_params * b // shard))
    pool.items.append((f"text encoders ({encoders / 1e9:.2f} B params)", encoders * b))
    if lora:
        pool.items.append((f"LoRA adapters (rank {cfg.model.lora_rank}, {trainable / 1e6:.1f} M params, float32)",
                           trainable * 4))
    else:
        if masters:
            pool.items.append((f"float32 master weights{how}", m.denoiser_params * 4 // shard))
        if lr.kl_beta > 0:
            pool.items.append(("frozen reference denoiser (KL, full fine-tune)", m.denoiser_params * b))
    pool.items += [(f"gradients ({trainable / 1e6:.1f} M trainable){how}", trainable * tb // shard),
                   (f"AdamW moments{how}", 2 * trainable * 4 // shard)]
    rows = learner_rows(cfg, m)
    ckpt = "with" if lr.gradient_checkpointing else "without"
    pool.items.append((f"activations: {rows} rows, {ckpt} gradient checkpointing", learner_activations(cfg, m, rows)))
    n = decisions_per_iteration(cfg)
    pool.work.append(f"{n} decisions/iteration -> {lr.workers} workers x {lr.minibatches} optimizer steps x "
                     f"{lr.epochs} epochs; {n * lr.epochs} forward+backward rows x{_cfg_rows(cfg, m)} (CFG)")
    return pool


def make_plan(cfg: Config, gpu_gib: float = 80.0) -> Plan:
    m = model_facts(cfg.model.pretrained, lora_rank=cfg.model.lora_rank, lora_targets=tuple(cfg.model.lora_targets))
    pools = [sampler_pool(cfg, m), reward_pool(cfg, m), learner_pool(cfg, m)]
    problems = []
    for pool in pools:
        if pool.num_gpus > 0:
            pool.items.append(("CUDA context + allocator slack", CUDA_RESERVE))
            budget = gpu_gib * GiB * min(pool.num_gpus, 1.0)  # fractional num_gpus: a share of one GPU
            if pool.total > budget:
                problems.append(f"{pool.name}: needs {pool.total / GiB:.1f} GiB per actor, its share of a "
                                f"{gpu_gib:g} GiB GPU is {budget / GiB:.1f} GiB; {_fix(cfg, pool.name)}")
    return Plan(m, pools, gpu_gib, problems, sync_lines(cfg, m))


def _fix(cfg: Config, pool: str) -> str:
    if pool == "sampler":
        return ("fix: lower tree.max_batch (rows per denoiser call) or give each sampler more of a GPU "
                "(pools.sampler.num_gpus)")
    if pool == "reward":
        return "fix: set pools.reward_chunk (leaves per call) lower, or give each reward actor a whole GPU"
    fixes = []
    if cfg.model.lora_rank == 0:
        fixes.append("train LoRA (model.lora_rank=32)")
        if cfg.learner.strategy == "ddp":
            fixes.append("shard with learner.strategy=fsdp over more learner.workers")
    if not cfg.learner.gradient_checkpointing:
        fixes.append("set learner.gradient_checkpointing=true")
    fixes.append("lower learner.micro_batch")
    return "fix: " + ", or ".join(fixes)


def render(plan: Plan) -> str:
    m = plan.model
    lines = [f"model: {m.pretrained} ({m.family}, {m.denoiser_class}, {m.denoiser_params:,} params) -- {m.source}"]
    for pool in plan.pools:
        where = f"{pool.num_gpus:g} GPU each" if pool.num_gpus > 0 else "CPU (host memory)"
        lines.append(f"{pool.name}: {pool.actors} x ({where})")
        for what, nbytes in pool.items:
            lines.append(f"  {nbytes / GiB:8.2f} GiB  {what}")
        lines.append(f"  {pool.total / GiB:8.2f} GiB  total per {'worker' if pool.name == 'learner' else 'actor'}")
        lines += [f"  {w}" for w in pool.work]
    lines += plan.sync
    if plan.problems:
        lines += ["does not fit:"] + [f"  {p}" for p in plan.problems]
    else:
        lines.append(f"fits: every GPU pool within its share of a {plan.gpu_gib:g} GiB GPU")
    return "\n".join(lines)


def check(plan: Plan) -> None:
    """Raise ConfigError for a plan that does not fit (the message names the pool and the fix)."""
    if plan.problems:
        raise ConfigError("the plan does not fit: " + "; ".join(plan.problems))
