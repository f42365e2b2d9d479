"""LoRA on the diffusion transformer through peft, and export in the form diffusers loads.

`add_lora` injects adapters with diffusers' `ModelMixin.add_adapter(LoraConfig(...))` (the same
call diffusers' `train_dreambooth_lora_sd3.py` makes); the adapter weights are kept in float32
even when the base model runs in bf16/fp16, as diffusers' training scripts do
(`cast_training_params`), so small updates are not rounded away. `export_lora` writes
`pytorch_lora_weights.safetensors` with the pipeline class's `save_lora_weights`, including the
adapter config as metadata so `pipe.load_lora_weights(dir)` restores lora_alpha != rank exactly.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def add_lora(transformer: torch.nn.Module, *, rank: int, alpha: float | None, targets: tuple[str, ...],
             seed: int = 0) -> list[str]:
    """Freeze the transformer, inject LoRA adapters; return the names of the trainable tensors.

    init_lora_weights="gaussian": A ~ N(0, 1/rank), B = 0, so the adapted model starts equal to
    the base model. `seed` makes that init reproducible without touching the global RNG's state.
    """
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    transformer.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha else rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(config)
    names = [n for n, p in transformer.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError(f"LoRA targets {targets} matched no module of {type(transformer).__name__}")
    for n, p in transformer.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return names


@contextlib.contextmanager
def adapters_disabled(transformer: torch.nn.Module):
    """Run the base model (adapters off) inside the block, restoring them on exit."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def export_lora(pipeline_cls, transformer: torch.nn.Module, out_dir: str | Path,
                denoiser_name: str = "transformer") -> Path:
    """Write the denoiser's LoRA in diffusers format: `pipe.load_lora_weights(out_dir)`.
    denoiser_name: "transformer" (SD3, FLUX) or "unet" (SD1.5), the pipeline's save_lora_weights keywords."""
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(transformer).items()}
    metadata = transformer.peft_config["default"].to_dict()
    pipeline_cls.save_lora_weights(out_dir, **{f"{denoiser_name}_lora_layers": layers,
                                                f"{denoiser_name}_lora_adapter_metadata": metadata})
    return out_dir
