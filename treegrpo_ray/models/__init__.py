"""Model layer: the diffusion policy over a diffusers pipeline (`policy`), its prompt-embedding
cache (`prompts`) and LoRA helpers (`lora`). May import diffusers/transformers/peft, never ray."""
from treegrpo_ray.models.policy import DiffusionPolicy

__all__ = ["DiffusionPolicy"]
