"""Tiny but real SD3 components for the miniature world, and their assembly into a pipeline.

Mirrors the layout of Stable Diffusion 3 (Esser et al. 2024; diffusers `StableDiffusion3Pipeline`)
at toy scale:

* two CLIP text encoders with projection (hidden 32 and 48; SD3 uses CLIP-L 768 and CLIP-G 1280),
  whose penultimate hidden states are concatenated (80) and zero-padded to `JOINT_ATTENTION_DIM`
  (96), exactly as SD3 pads 2048 -> 4096; pooled = concat of the projected EOS features (80);
* a 1-layer `T5EncoderModel` with d_model = `JOINT_ATTENTION_DIM` over a 57-piece Unigram
  tokenizer, appended after the CLIP tokens as in SD3. Departure from the plan of leaving the T5
  slot empty: diffusers' `StableDiffusion3Pipeline.from_pretrained(dir)` refuses a saved pipeline
  whose `text_encoder_3` is null unless the caller passes `text_encoder_3=None, tokenizer_3=None`,
  which a generic SD3 loader must not do (it would drop SD3.5's T5). With a tiny T5 the miniature
  loads through exactly the call a GPU user makes. `MAX_SEQUENCE_LENGTH` = 16 T5 tokens;
* an `AutoencoderKL` 32x32x3 -> 16x16x4 without quant convs (SD3 has none either), its
  `scaling_factor` / `shift_factor` set from data statistics after training;
* an `SD3Transformer2DModel` on the 16x16x4 latent, patch 2 (64 image tokens), inner dim 96;
* `FlowMatchEulerDiscreteScheduler` with shift 1.0 (at 16x16 latents the SD3 shift of 3.0 spends
  most steps at high noise; shift 1 gives evenly spaced sigmas 1.0, 0.889, ..., 0.112, 0.001, 0
  for 10 steps).
"""
from __future__ import annotations

from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from treegrpo_ray.miniature import MAX_SEQUENCE_LENGTH as _MAX_SEQUENCE_LENGTH

TEXT_HIDDEN = (32, 48)          # text_encoder, text_encoder_2
JOINT_ATTENTION_DIM = 96        # >= sum(TEXT_HIDDEN); the rest is zero padding, as in SD3
POOLED_DIM = sum(TEXT_HIDDEN)   # 80
LATENT_CHANNELS = 4
LATENT_SIZE = 16                # 32x32 image -> 16x16 latent (one VAE downsampling)
MAX_SEQUENCE_LENGTH = _MAX_SEQUENCE_LENGTH  # 16 T5 tokens (13 words + </s> + padding)
SCHEDULER_SHIFT = 1.0


def build_text_encoder(tokenizer: CLIPTokenizer, hidden: int, seed: int) -> CLIPTextModelWithProjection:
    """A 2-layer CLIP text encoder over `tokenizer`'s vocabulary (random init from `seed`)."""
    import torch

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        projection_dim=hidden, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config)
    return model.eval().requires_grad_(False)


def build_t5_encoder(tokenizer: T5Tokenizer, seed: int) -> T5EncoderModel:
    """A 1-layer T5 encoder whose width is the transformer's joint_attention_dim (random, frozen)."""
    import torch

    config = T5Config(
        vocab_size=len(tokenizer), d_model=JOINT_ATTENTION_DIM, d_kv=JOINT_ATTENTION_DIM // 2,
        d_ff=2 * JOINT_ATTENTION_DIM, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return model.eval().requires_grad_(False)


def build_vae() -> AutoencoderKL:
    """32x32x3 <-> 16x16x4. scaling/shift factors are placeholders until `set_latent_stats`."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=8, sample_size=32, scaling_factor=1.0, shift_factor=0.0,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False,
    )


def build_transformer(num_layers: int = 6, heads: int = 4, head_dim: int = 24) -> SD3Transformer2DModel:
    """~2M-parameter SD3 MMDiT on the 16x16x4 latent (64 tokens of patch 2)."""
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=JOINT_ATTENTION_DIM,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=POOLED_DIM,
        pos_embed_max_size=LATENT_SIZE // 2,
    )


def build_scheduler() -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)


def assemble_pipeline(transformer, vae, text_encoders: tuple, tokenizers: tuple) -> StableDiffusion3Pipeline:
    """A real `StableDiffusion3Pipeline` from (clip, clip_2, t5) encoders and their tokenizers."""
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=build_scheduler(), vae=vae,
        text_encoder=text_encoders[0], tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1], tokenizer_2=tokenizers[1],
        text_encoder_3=text_encoders[2], tokenizer_3=tokenizers[2],
    )
