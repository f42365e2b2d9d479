"""Measure, on tiny models on CPU, the memory that `treegrpo_ray.plan` estimates.

    python -m tools.plan_calibrate    # fits plan.ACTIVATIONS (tiny pipelines) and plan.VAE_DECODE (SD VAE structure)

Each case runs in a fresh interpreter (`measure_in_subprocess`) with glibc's malloc told to serve
every block above 64 KiB by mmap and to give freed memory back at once (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_), so the resident set size follows the live tensors. The denoiser is
loaded first; then the peak RSS is reset (`/proc/self/clear_refs` = 5,
Linux >= 4.0) and `steps` learner steps run: a forward on `rows` rows, a loss, backward and one
AdamW step each (what `learning.learner.GRPOLearner` does per micro-batch, without the SDE
log-prob around it, which is tiny). Reported, in bytes above the resident set before the first
step: `forward` (after the first forward: the activations autograd saved, plus the output),
`peak` (the high-water mark over all steps: activations + gradients + AdamW state + temporaries),
and the `trainable` parameter count. With grad=False, one no-grad forward (the sampler's case).

LoRA is applied with peft's `LoraConfig(init_lora_weights="gaussian")` through diffusers'
`add_adapter` and the adapters cast to float32, as `treegrpo_ray.models.lora.add_lora` does.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}
REPO = Path(__file__).resolve().parents[1]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def load_denoiser(pipeline_dir: str):
    """The denoiser of a local diffusers pipeline dir, loaded with its weights."""
    import diffusers

    index = json.loads((Path(pipeline_dir) / "model_index.json").read_text())
    sub = "transformer" if "transformer" in index else "unet"
    return getattr(diffusers, index[sub][1]).from_pretrained(pipeline_dir, subfolder=sub)


def denoiser_inputs(model, rows: int, latent_side: int, text_tokens: int, dtype: str = "float32") -> dict:
    """Random inputs of the shapes the policy feeds each family (SD3, FLUX, UNet, Qwen-Image, Wan), in `dtype`."""
    floating = ("hidden_states", "sample", "encoder_hidden_states", "pooled_projections")
    return {k: v.to(getattr(torch, dtype)) if k in floating else v
            for k, v in _inputs(model, rows, latent_side, text_tokens).items()}


def _inputs(model, rows: int, latent_side: int, text_tokens: int) -> dict:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    name = type(model).__name__
    t = torch.full((rows,), 500.0)
    if name == "SD3Transformer2DModel":
        return dict(hidden_states=torch.randn(rows, cfg.in_channels, latent_side, latent_side, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(rows, text_tokens, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(rows, cfg.pooled_projection_dim, generator=g))
    if name == "FluxTransformer2DModel":
        side = latent_side // 2                     # 2x2 latent packing: (C, h, w) -> (h/2 * w/2, 4C)
        extra = {"guidance": torch.full((rows,), 3.5)} if cfg.guidance_embeds else {}
        return dict(hidden_states=torch.randn(rows, side * side, cfg.in_channels, generator=g), timestep=t / 1000,
                    encoder_hidden_states=torch.randn(rows, text_tokens, cfg.joint_attention_dim, generator=g),
                    pooled_projections=torch.randn(rows, cfg.pooled_projection_dim, generator=g),
                    img_ids=torch.zeros(side * side, 3), txt_ids=torch.zeros(text_tokens, 3), **extra)
    if name == "QwenImageTransformer2DModel":
        side = latent_side // 2                     # 2x2 latent packing, as FLUX
        return dict(hidden_states=torch.randn(rows, side * side, cfg.in_channels, generator=g), timestep=t / 1000,
                    encoder_hidden_states=torch.randn(rows, text_tokens, cfg.joint_attention_dim, generator=g),
                    img_shapes=[[(1, side, side)]] * rows)
    if name == "WanTransformer3DModel":  # video: FRAMES_FOR_WAN latent frames of latent_side x latent_side
        return dict(hidden_states=torch.randn(rows, cfg.in_channels, WAN_LATENT_FRAMES, latent_side, latent_side,
                                              generator=g),
                    timestep=t, encoder_hidden_states=torch.randn(rows, text_tokens, cfg.text_dim, generator=g))
    if name == "UNet2DConditionModel":
        return dict(sample=torch.randn(rows, cfg.in_channels, latent_side, latent_side, generator=g), timestep=t,
                    encoder_hidden_states=torch.randn(rows, text_tokens, cfg.cross_attention_dim, generator=g))
    raise ValueError(f"no inputs known for {name}")


def measure(*, pipeline_dir: str, rows: int, latent_side: int, text_tokens: int, lora_rank: int = 0,
            lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"), gradient_checkpointing: bool = False,
            grad: bool = True, steps: int = 2, dtype: str = "float32") -> dict:
    """`steps` learner steps (or, grad=False, one no-grad forward) in this process; see the module
    docstring. Two steps by default: AdamW's state exists from the first step on, so the second
    step's peak is the steady state a run sees."""
    model = load_denoiser(pipeline_dir).eval().to(getattr(torch, dtype))
    if lora_rank:
        from peft import LoraConfig
        model.requires_grad_(False)
        model.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                     target_modules=list(lora_targets)))
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        model.requires_grad_(grad)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4) if grad else None
    with torch.no_grad():
        model(**denoiser_inputs(model, 1, latent_side, text_tokens, dtype), return_dict=False)  # warm up lazy inits
    inputs = denoiser_inputs(model, rows, latent_side, text_tokens, dtype)
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    forward = None
    for _ in range(steps if grad else 1):
        with torch.set_grad_enabled(grad):
            out = model(**inputs, return_dict=False)[0]
            forward = _status("VmRSS") - base if forward is None else forward  # the first step: no AdamW state yet
            if grad:
                out.float().square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        del out
    peak = _status("VmHWM") - base
    return {"forward": forward, "peak": peak, "trainable": sum(p.numel() for p in params),
            "params": sum(p.numel() for p in model.parameters()), "rows": rows, "latent_side": latent_side,
            "text_tokens": text_tokens, "lora_rank": lora_rank, "gradient_checkpointing": gradient_checkpointing,
            "grad": grad, "steps": steps, "dtype": dtype, "denoiser": type(model).__name__}


SD_VAE = {"in_channels": 3, "out_channels": 3, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
          "norm_num_groups": 32}  # the SD1.x/SD3/FLUX VAE structure (latent_channels 4 or 16)


def measure_decode(*, rows: int, latent_side: int, latent_channels: int = 16) -> dict:
    """Peak bytes of one no-grad decode of `rows` latents by a random-init VAE of the real SD
    structure (SD_VAE, 83.8 M parameters), float32, as rewards/decode.LatentDecoder runs it."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(latent_channels=latent_channels, **SD_VAE).eval().requires_grad_(False)
    z = torch.randn(rows, latent_channels, latent_side, latent_side)
    with torch.no_grad():
        vae.decode(z[:1, :, :8, :8])                         # lazy inits
    gc.collect()
    base = _status("VmRSS")
    _reset_peak()
    with torch.no_grad():
        out = vae.decode(z).sample
    peak = _status("VmHWM") - base
    return {"peak": peak, "rows": rows, "pixels": out.shape[-1] * out.shape[-2]}


def measure_in_subprocess(timeout: float = 300, **kwargs) -> dict:
    """`measure(**kwargs)` in a fresh interpreter with the malloc settings above."""
    env = {**os.environ, **MALLOC_ENV, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-m", "tools.plan_calibrate", "--one", json.dumps(kwargs)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"measurement failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


FAMILY_KW = {"sd3": {"sd35": True}, "flux": {}, "sd15": {}, "qwenimage": {}, "wan": {}}
# tiny VAEs: factor 2 (Wan's: 8); SD3's pos_embed caps 64
RESOLUTIONS = {"sd3": (32, 64), "flux": (64, 128), "sd15": (32, 64), "qwenimage": (64, 128), "wan": (128, 256)}
WAN_NUM_FRAMES = 9                                   # the Wan fit's clips: 9 frames -> 3 latent frames
WAN_LATENT_FRAMES = (WAN_NUM_FRAMES - 1) // 4 + 1


def tiny_pipeline(family: str, root: str | Path) -> str:
    """The tiny pipeline of `family` (tools.tiny_pipelines), saved under root/family once."""
    from tools.tiny_pipelines import save_tiny
    out = Path(root) / family
    if not (out / "pipeline" / "model_index.json").is_file():
        save_tiny(family, out, **FAMILY_KW[family])
    return str(out / "pipeline")


def tiny_config(pipeline_dir: str, resolution: int, micro_batch: int, *overrides: str):
    """A config whose learner forwards `micro_batch` decisions of `resolution` px on the tiny pipeline."""
    from treegrpo_ray.config import load_config
    return load_config(None, [f"model.pretrained={pipeline_dir}", f"model.resolution={resolution}",
                              "tree.k=2", "tree.depth=2", "tree.num_steps=4", "prompts_per_iteration=16",
                              "learner.minibatches=1", f"learner.micro_batch={micro_batch}", *overrides])


def case_for(cfg, grad: bool = True) -> dict:
    """measure() kwargs with the shapes the plan assumes for `cfg`'s learner (grad) or sampler."""
    from treegrpo_ray import plan
    from treegrpo_ray.plan.facts import model_facts
    m = model_facts(cfg.model.pretrained, lora_rank=cfg.model.lora_rank, lora_targets=tuple(cfg.model.lora_targets))
    _, text = plan.row_tokens(cfg, m)
    rows = plan.learner_rows(cfg, m) if grad else plan.sampler_rows(cfg, m)
    return dict(pipeline_dir=cfg.model.pretrained, rows=rows, latent_side=cfg.model.resolution // m.vae_scale_factor,
                text_tokens=text, lora_rank=cfg.model.lora_rank, lora_targets=tuple(cfg.model.lora_targets),
                gradient_checkpointing=cfg.learner.gradient_checkpointing, grad=grad, dtype=cfg.model.dtype)


def estimate(cfg) -> dict:
    """The plan's learner bytes that a measurement sees above its baseline (weights and adapters
    are loaded before it): gradients + AdamW moments + activations."""
    from treegrpo_ray import plan
    layout = plan.make_plan(cfg)
    learner = next(p for p in layout.pools if p.name == "learner")
    keep = ("gradients", "AdamW", "activations")
    return {"total": sum(b for what, b in learner.items if what.startswith(keep)),
            "activations": next(b for what, b in learner.items if what.startswith("activations"))}


def _slope(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y against x."""
    a = torch.tensor([[x, 1.0] for x, _ in points], dtype=torch.float64)
    y = torch.tensor([[v] for _, v in points], dtype=torch.float64)
    slope, intercept = torch.linalg.lstsq(a, y).solution.flatten().tolist()
    return slope, intercept


def fit(family: str, root: str | Path, rows: tuple[int, ...] = (16, 48)) -> dict:
    """The family's activation constants (plan.ACTIVATIONS) from measured tiny-model steps over
    `rows` x RESOLUTIONS[family], full fine-tune in float32 (gradients + AdamW = 12 B per trainable
    parameter are subtracted from the peaks). Slopes with an intercept: the process's fixed part.
      grad      peak of a step without checkpointing, per row and block
      ckpt      forward with checkpointing (the kept block inputs), per row and block
      recompute what the checkpointed step's peak adds on top, per row (one block recomputed + backward)
      nograd    peak of one no-grad forward, per row"""
    from treegrpo_ray import plan
    from treegrpo_ray.plan.facts import model_facts
    pipe = tiny_pipeline(family, root)
    m = model_facts(pipe, lora_rank=0, lora_targets=())
    runs = []
    for res in RESOLUTIONS[family]:
        for n in rows:
            video = [f"model.num_frames={WAN_NUM_FRAMES}"] if family == "wan" else []
            cfg = tiny_config(pipe, res, n, "model.guidance_scale=1", f"tree.max_batch={n}", *video)
            unit = plan.activation_unit(cfg, m)
            g = measure_in_subprocess(**case_for(cfg))
            c = measure_in_subprocess(**dict(case_for(cfg), gradient_checkpointing=True))
            ng = measure_in_subprocess(**case_for(cfg, grad=False))
            optim = 12 * g["trainable"]
            runs.append((n, unit, g["peak"] - optim, c["forward"], c["peak"] - optim, ng["peak"]))
            print(f"  {family} {res}px x {n} rows: unit {unit} B; step peak {g['peak'] / 2**20:.1f} MiB, checkpointed "
                  f"forward {c['forward'] / 2**20:.1f} / peak {c['peak'] / 2**20:.1f} MiB, no-grad peak "
                  f"{ng['peak'] / 2**20:.1f} MiB (gradients + AdamW {optim / 2**20:.1f} MiB)", flush=True)
    grad, _ = _slope([(n * m.layers * u, p) for n, u, p, _, _, _ in runs])
    ckpt, _ = _slope([(n * m.layers * u, f) for n, u, _, f, _, _ in runs])
    recompute, _ = _slope([(n * u, p - ckpt * n * m.layers * u) for n, u, _, _, p, _ in runs])
    nograd, _ = _slope([(n * u, p) for n, u, _, _, _, p in runs])
    return {k: round(v, 1) for k, v in dict(grad=grad, ckpt=ckpt, recompute=recompute, nograd=nograd).items()}


def fit_decode(sides: tuple[int, ...] = (16, 32), rows: tuple[int, ...] = (1, 2)) -> float:
    """plan.VAE_DECODE: decode peak per image in units of (H x W x 128 channels x 4 bytes)."""
    points = []
    for side in sides:
        for n in rows:
            d = measure_in_subprocess(decode=dict(rows=n, latent_side=side))
            points.append((n * d["pixels"] * SD_VAE["block_out_channels"][0] * 4, d["peak"]))
            print(f"  decode {n} x {8 * side}px: peak {d['peak'] / 2**20:.1f} MiB", flush=True)
    return round(_slope(points)[0], 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", help="JSON kwargs of measure(); prints its result as JSON (used by measure_in_subprocess)")
    p.add_argument("--root", default="/tmp/treegrpo_plan_calibrate", help="where the tiny pipelines are saved")
    args = p.parse_args(argv)
    if args.one:
        torch.set_num_threads(1)
        kwargs = json.loads(args.one)
        print(json.dumps(measure_decode(**kwargs["decode"]) if "decode" in kwargs else measure(**kwargs)))
        return 0
    constants = {}
    for family in FAMILY_KW:
        constants[family] = fit(family, args.root)
        print(f"{family}: {constants[family]}")
    print("ACTIVATIONS =", constants)
    print("VAE_DECODE =", fit_decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
