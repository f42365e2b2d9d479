"""Tiny, randomly initialised pipelines of each supported family, built offline (tests, gpu_check).

SD3 / SD3.5 (`build_tiny_sd3`), FLUX.1 (`build_tiny_flux`), SD1.5 with DDIM (`build_tiny_sd15`), Qwen-Image
(`build_tiny_qwenimage`) and Wan2.1 text-to-video (`build_tiny_wan`):
each has its family's real structure at toy width, so the production loading path runs on it.
The SD3 notes below hold for the others where they share parts (CLIP tokenizer, VAE, sizes).

Everything is a real diffusers/transformers component (SD3Transformer2DModel, AutoencoderKL,
two CLIPTextModelWithProjection with CLIPTokenizers, FlowMatchEulerDiscreteScheduler), only
small; text_encoder_3 / tokenizer_3 (T5) are None, so the pipeline pads the T5 slot with zeros.
The CLIP tokenizer is built from a byte-level vocab.json / merges.txt written here, so nothing is
downloaded. `save_tiny_sd3(dir)` writes the pipeline with `save_pretrained`; tests then load it
back through the production path (`from_pretrained(local_dir)` with HF_HUB_OFFLINE=1).

Sizes: latents (4, 8, 8) for 16x16 images (VAE scale factor 2), 16 image tokens (patch 2),
text context 77 CLIP + `max_sequence_length` zero T5 tokens of width 32.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

LATENT_CHANNELS = 4
SAMPLE_SIZE = 8          # latent side; images are SAMPLE_SIZE * 2 pixels
CLIP_HIDDEN = 16         # each CLIP: hidden 16 -> joint 32 after concat, projection 16 -> pooled 32
JOINT_DIM = 2 * CLIP_HIDDEN
POOLED_DIM = 2 * CLIP_HIDDEN


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins for bytes that byte-level BPE (GPT-2/CLIP) uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_tiny_clip_tokenizer_files(directory: str | Path) -> Path:
    """vocab.json = 256 byte symbols, the same with the end-of-word marker, then the two
    specials (514 ids); merges.txt holds a handful of merges so BPE has real work to do."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars]
    merges = [("r", "e"), ("e", "d</w>"), ("re", "d</w>"), ("c", "i"), ("s", "q"), ("b", "l")]
    tokens += ["".join(m) for m in merges if "".join(m) not in tokens]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return directory


def tiny_clip_tokenizer(directory: str | Path):
    from transformers import CLIPTokenizer

    write_tiny_clip_tokenizer_files(directory)
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)


def tiny_clip_text_encoder(vocab_size: int, bos_id: int, eos_id: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         projection_dim=CLIP_HIDDEN, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg).eval()


def tiny_t5(seed: int):
    """A T5 encoder of width JOINT_DIM (SD3's T5 width equals joint_attention_dim) and its
    tokenizer (a real Unigram T5Tokenizer over a small word list: nothing downloaded)."""
    from transformers import T5Config, T5EncoderModel

    from tools.miniature.tokenizer import build_t5_tokenizer
    words = "a an the red green blue yellow circle square triangle and of on left right big small".split()
    tokenizer = build_t5_tokenizer(words, max_length=32)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=JOINT_DIM, d_kv=8, d_ff=2 * JOINT_DIM, num_layers=1,
                   num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return T5EncoderModel(cfg).eval(), tokenizer


def build_tiny_sd3(tokenizer_dir: str | Path, seed: int = 0, dynamic_shift: bool = False, sd35: bool = False):
    """A random-init tiny StableDiffusion3Pipeline (float32, CPU). sd35: SD3.5-medium's architecture
    scaled down: MMDiT-X dual-attention layers, RMS q/k norm and a T5 encoder (shift 3.0 is in both)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    arch = dict(dual_attention_layers=(0, 1), qk_norm="rms_norm") if sd35 else {}
    transformer = SD3Transformer2DModel(
        sample_size=SAMPLE_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=POOLED_DIM, out_channels=LATENT_CHANNELS, pos_embed_max_size=16, **arch)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=2 * SAMPLE_SIZE,
                        shift_factor=0.0609, scaling_factor=1.5305)
    tok_dir = Path(tokenizer_dir)
    tokenizer = tiny_clip_tokenizer(tok_dir / "tokenizer")
    tokenizer_2 = tiny_clip_tokenizer(tok_dir / "tokenizer_2")
    vocab = tokenizer.get_vocab()
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    sched_kwargs = dict(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64) if dynamic_shift else {}
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **sched_kwargs)
    t5, t5_tokenizer = tiny_t5(seed + 3) if sd35 else (None, None)
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae,
        text_encoder=tiny_clip_text_encoder(len(vocab), bos, eos, seed + 1), tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(len(vocab), bos, eos, seed + 2), tokenizer_2=tokenizer_2,
        text_encoder_3=t5, tokenizer_3=t5_tokenizer)


def save_tiny_sd3(out_dir: str | Path, seed: int = 0, dynamic_shift: bool = False, sd35: bool = False) -> Path:
    """Build the tiny pipeline and `save_pretrained` it to out_dir/pipeline; returns that dir."""
    out_dir = Path(out_dir)
    pipe = build_tiny_sd3(out_dir / "tokenizer_src", seed=seed, dynamic_shift=dynamic_shift, sd35=sd35)
    pipe.save_pretrained(out_dir / "pipeline")
    return out_dir / "pipeline"


def tiny_clip_text_model(vocab_size: int, bos_id: int, eos_id: int, seed: int):
    """A CLIPTextModel (no projection): FLUX takes its pooled output, SD1.5 its token states."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=CLIP_HIDDEN, intermediate_size=2 * CLIP_HIDDEN,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=eos_id)
    torch.manual_seed(seed)
    return CLIPTextModel(cfg).eval()


def _tiny_vae(**factors):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=4, sample_size=2 * SAMPLE_SIZE, **factors)


def build_tiny_flux(tokenizer_dir: str | Path, seed: int = 0, guidance_embeds: bool = True):
    """A random-init tiny FluxPipeline with FLUX.1-dev's structure: double- and single-stream
    blocks, 3-axis RoPE, the guidance embedding (dev; guidance_embeds=False is schnell), CLIP-L
    pooled + T5 tokens, 2x2 packed latents (4 channels -> 16 per token), FLUX's VAE factors and a
    dynamically shifted FlowMatchEuler scheduler. 16x16 images, 8x8 latents, 16 image tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=JOINT_DIM, pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4))
    vae = _tiny_vae(shift_factor=0.1159, scaling_factor=0.3611)
    tokenizer = tiny_clip_tokenizer(Path(tokenizer_dir) / "tokenizer")
    vocab = tokenizer.get_vocab()
    t5, t5_tokenizer = tiny_t5(seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                                base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5,
                                                max_shift=1.15)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae,
                        text_encoder=tiny_clip_text_model(len(vocab), vocab["<|startoftext|>"],
                                                          vocab["<|endoftext|>"], seed + 1),
                        tokenizer=tokenizer, text_encoder_2=t5, tokenizer_2=t5_tokenizer)


def build_tiny_sd15(tokenizer_dir: str | Path, seed: int = 0):
    """A random-init tiny StableDiffusionPipeline with SD1.5's structure: a cross-attention
    UNet2DConditionModel (epsilon prediction), one CLIP text encoder, SD1.5's VAE scaling 0.18215
    and its DDIMScheduler config (scaled-linear betas, leading spacing, steps_offset 1,
    set_alpha_to_one False). No safety checker. 16x16 images, 8x8 latents."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=SAMPLE_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CLIP_HIDDEN, attention_head_dim=4,
        norm_num_groups=4)
    vae = _tiny_vae(scaling_factor=0.18215)
    tokenizer = tiny_clip_tokenizer(Path(tokenizer_dir) / "tokenizer")
    vocab = tokenizer.get_vocab()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="leading", prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=tiny_clip_text_model(len(vocab), vocab["<|startoftext|>"], vocab["<|endoftext|>"],
                                                   seed + 1),
        tokenizer=tokenizer, unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # the three Qwen-Image's template uses
# the template's words as Qwen2's byte-level pre-tokenizer cuts them ("Ġ" = a leading space); with
# them merged, the prefix "<|im_start|>system\nDescribe ... background:<|im_end|>\n<|im_start|>user\n"
# is 34 tokens, QwenImagePipeline.prompt_template_encode_start_idx
QWEN_TEMPLATE_WORDS = ("system", "Describe", "user", *("Ġ" + w for w in (
    "the image by detailing color shape size texture quantity text spatial relationships of objects and "
    "background red blue green circle square triangle a").split()))
QWEN_TEXT_HIDDEN = 16  # Qwen2.5-VL hidden size = the transformer's joint_attention_dim


def tiny_qwen_tokenizer(directory: str | Path):
    """A real Qwen2Tokenizer (byte-level BPE, Qwen2's pre-tokenizer regex) over the 256 byte symbols,
    the merges that make each word of QwenImagePipeline's prompt template one token, and the
    chat-template specials, written to `directory` (nothing downloaded). So the template's prefix is
    34 tokens, as with the real tokenizer, and the 34 the pipeline drops are exactly the prefix."""
    from transformers import Qwen2Tokenizer

    chars = _bytes_to_unicode()
    merges = []
    for word in QWEN_TEMPLATE_WORDS:  # merge each word left to right, as byte-level BPE learns them
        for i in range(2, len(word) + 1):
            pair = (word[:i - 1], word[i - 1])
            if pair not in merges:
                merges.append(pair)
    tokens = list(dict.fromkeys(chars + ["".join(m) for m in merges]))
    vocab = {t: i for i, t in enumerate(tokens)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=1058)
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS[1:])})
    tokenizer.save_pretrained(str(directory))
    return Qwen2Tokenizer.from_pretrained(str(directory))


def tiny_qwen_text_encoder(vocab_size: int, bos_id: int, eos_id: int, seed: int):
    """Qwen2.5-VL at toy width (2 text layers, M-RoPE sections summing to head_dim / 2, a 1-layer
    vision tower it never runs). bos/pad <|endoftext|>, eos <|im_end|> as in Qwen2.5-VL-7B; its
    image/video token ids are three ids past the tokenizer's, which it never emits."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        text_config={"hidden_size": QWEN_TEXT_HIDDEN, "intermediate_size": 32, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab_size + 3,
                     "rope_scaling": {"type": "default", "rope_type": "default", "mrope_section": [1, 1, 2]},
                     "rope_theta": 1_000_000.0, "max_position_embeddings": 2048, "bos_token_id": bos_id,
                     "eos_token_id": eos_id, "pad_token_id": bos_id},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2,
                       "out_hidden_size": QWEN_TEXT_HIDDEN},
        vocab_size=vocab_size + 3, image_token_id=vocab_size, video_token_id=vocab_size + 1,
        vision_start_token_id=vocab_size + 2, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=bos_id)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def build_tiny_qwenimage(tokenizer_dir: str | Path, seed: int = 0):
    """A random-init tiny QwenImagePipeline with Qwen-Image's structure: the dual-stream MMDiT
    (QwenImageTransformer2DModel: 2x2 packed latents, 3-axis scaled RoPE, no guidance embedding),
    the causal 3-D VAE (AutoencoderKLQwenImage, one-frame latents, per-channel latents_mean/std),
    a Qwen2.5-VL text encoder with a Qwen2Tokenizer, and Qwen/Qwen-Image's published scheduler
    (dynamic exponential shift, base_shift 0.5, max_shift 0.9, shift_terminal 0.02) with its
    256 / 8192 image-token range scaled to 4 / 128. 16x16 images, 8x8 latents, 16 image tokens."""
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=QWEN_TEXT_HIDDEN, axes_dims_rope=(2, 2, 4))
    g = torch.Generator().manual_seed(seed + 5)  # non-trivial normalisation, so a missed mean/std shows
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=(torch.randn(LATENT_CHANNELS, generator=g) * 0.5).tolist(),
        latents_std=(1 + torch.rand(LATENT_CHANNELS, generator=g)).tolist())
    tokenizer = tiny_qwen_tokenizer(Path(tokenizer_dir) / "tokenizer")
    vocab = tokenizer.get_vocab()
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=128,
        base_shift=0.5, max_shift=0.9, shift_terminal=0.02, time_shift_type="exponential")
    return QwenImagePipeline(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer,
                             text_encoder=tiny_qwen_text_encoder(len(tokenizer), vocab["<|endoftext|>"],
                                                                 vocab["<|im_end|>"], seed + 1))



WAN_LATENT_CHANNELS = 4  # Wan2.1 has 16 (z_dim); 4 keeps the tiny VAE and transformer small


def build_tiny_wan(tokenizer_dir: str | Path, seed: int = 0):
    """A random-init tiny WanPipeline with Wan2.1 T2V's structure: a WanTransformer3DModel (patch
    (1, 2, 2), RoPE over frames x rows x columns, RMS q/k norm across heads, cross-attention to
    the text), an AutoencoderKLWan with Wan's 4x temporal / 8x spatial compression and per-channel
    latents_mean / latents_std (made-up values here: the pipeline denormalises with them), a UMT5
    text encoder with a real Unigram T5 tokenizer (Wan ships a UMT5 tokenizer; the pipeline reads
    it through AutoTokenizer, so any T5-style tokenizer loads) and a FlowMatchEulerDiscreteScheduler
    with Wan's shift 3.0 (480p; the hub ships UniPC with flow_shift 3.0, see families/wan.py for why
    we step with Euler). 32x32 pixels x 9 frames -> latents (4, 3, 4, 4) -> 3 x 2 x 2 = 12 tokens."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from tools.miniature.tokenizer import build_t5_tokenizer

    del tokenizer_dir  # the T5 tokenizer is built in memory; kept for the BUILDERS signature
    torch.manual_seed(seed)
    c = WAN_LATENT_CHANNELS
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=c, out_channels=c,
        text_dim=JOINT_DIM, freq_dim=32, ffn_dim=96, num_layers=2, cross_attn_norm=True,  # ffn 6x width (Wan2.1: 5.83x)
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    gen = torch.Generator().manual_seed(seed + 4)
    vae = AutoencoderKLWan(base_dim=4, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True],
                           latents_mean=(torch.randn(c, generator=gen) * 0.5).tolist(),
                           latents_std=(torch.rand(c, generator=gen) + 0.5).tolist())
    words = "a an the red green blue yellow circle square triangle and of on left right big small cat dog runs".split()
    tokenizer = build_t5_tokenizer(words, max_length=32)
    cfg = UMT5Config(vocab_size=len(tokenizer), d_model=JOINT_DIM, d_kv=8, d_ff=2 * JOINT_DIM, num_layers=1,
                     num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.0, decoder_start_token_id=0,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed + 3)
    text_encoder = UMT5EncoderModel(cfg).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                       scheduler=scheduler)



BUILDERS = {"sd3": build_tiny_sd3, "flux": build_tiny_flux, "sd15": build_tiny_sd15,
            "qwenimage": build_tiny_qwenimage, "wan": build_tiny_wan}


def save_tiny(family: str, out_dir: str | Path, seed: int = 0, **kw) -> Path:
    """Build a tiny pipeline of `family` (sd3 | flux | sd15 | qwenimage | wan) and `save_pretrained` it to
    out_dir/pipeline."""
    out_dir = Path(out_dir)
    pipe = BUILDERS[family](out_dir / "tokenizer_src", seed=seed, **kw)
    pipe.save_pretrained(out_dir / "pipeline")
    return out_dir / "pipeline"


if __name__ == "__main__":  # python -m tools.tiny_pipelines {sd3,flux,sd15,qwenimage,wan} OUT_DIR [--sd35]
    import argparse

    ap = argparse.ArgumentParser(description="save a tiny random-init pipeline of a model family (seed 0)")
    ap.add_argument("family", choices=sorted(BUILDERS))
    ap.add_argument("out_dir")
    ap.add_argument("--sd35", action="store_true", help="sd3 only: SD3.5-medium's layers")
    args = ap.parse_args()
    print(save_tiny(args.family, args.out_dir, **({"sd35": True} if args.sd35 else {})))
