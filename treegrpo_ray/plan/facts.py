"""What `treegrpo_ray.plan` knows about a pipeline's models, read from config files only: no weights.

Parameter counts are exact where they can be: the denoiser (and, for a local pipeline directory,
its text encoders and VAE) is instantiated from its config on the meta device, which allocates
nothing, and its parameters are counted. Sources:

* a local diffusers directory (or `miniature`, the shipped one): `model_index.json` names the
  classes; `transformer/config.json` or `unet/config.json`, `text_encoder*/config.json`,
  `vae/config.json` and `tokenizer/tokenizer_config.json` give the rest;
* the hub ids our configs name: the published denoiser config.json, shipped as
  `treegrpo_ray/plan/hub_configs/<name>.json` (facts, copied from the model repos' files):
    - sd35_medium.json: huggingface.co/stabilityai/stable-diffusion-3.5-medium transformer/config.json
      (gated); the same values appear verbatim in public code that rebuilds the pipeline without the
      gated repo (Tenstorrent's SD3.5 FP8 helpers, found by code search)
    - flux1_dev.json: huggingface.co/black-forest-labs/FLUX.1-dev transformer/config.json (gated);
      cross-checked against BFL's own naming in hpcaitech/Open-Sora configs/diffusion/inference/plugins/t2i2v.py
      (hidden 3072 = 24 x 128, depth 19 + 38 single, vec_in 768, context 4096, in 64, guidance_embed)
    - sd15.json: huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5 unet/config.json (a copy of
      runwayml's); the same dict appears verbatim in public T2I-Adapter UNet code (found by code search)
    - qwen_image.json: huggingface.co/Qwen/Qwen-Image transformer/config.json (Apache-2.0, not gated),
      as quoted verbatim in kohya-ss/musubi-tuner src/musubi_tuner/qwen_image/qwen_image_model.py
      (create_model); the same values are diffusers' QwenImageTransformer2DModel defaults
      (pooled_projection_dim is in the published file; diffusers 0.42 ignores it, so it is left out)
    - wan21_t2v_1p3b.json: huggingface.co/Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json as
      published (30 layers, 12 heads x 128 = 1536, ffn 8960, in/out 16, patch (1, 2, 2), text_dim
      4096, freq_dim 256, RMS q/k norm across heads), written from the model card / config as known
      to this project (no network here to re-fetch it); counted: 1,418,996,800 parameters
      (Wan's "1.3B"). Its text encoder is UMT5-XXL's encoder (google/umt5-xxl: d_model 4096, d_ff
      10240, 24 layers, 64 heads, vocabulary 256,384, gated-GELU: 5,680,910,336 on the meta
      device) and its VAE AutoencoderKLWan at diffusers' defaults, which are Wan2.1's (base_dim 96,
      z_dim 16, dim_mult [1, 2, 4, 4]: 126,892,531; 8x spatial, 4x temporal)
  and, for their text encoders and VAEs, a table of published parameter counts (TEXT_ENCODERS,
  VAES below). Those numbers were checked by building each published config on the meta device
  with transformers 5.25 / diffusers 0.42 (CLIP-L/14 text with projection 123,650,304, without
  123,060,480; OpenCLIP bigG/14 text with projection 694,659,840; T5-v1.1-XXL encoder
  4,762,310,656; SD3/FLUX 16-channel VAE 83,819,683; SD1.x VAE 83,653,863; Qwen2.5-VL-7B-Instruct's
  published config (text 28 x 3584, 28 heads / 4 kv, 18944 MLP, vocabulary 152064, untied lm_head;
  vision tower 32 x 1280) as Qwen2_5_VLForConditionalGeneration 8,292,166,656, the "8.29B" of its
  model card; AutoencoderKLQwenImage's default config, which Qwen-Image ships, 126,892,531).
* reward models: REWARD_MODELS below (open_clip ViT-H-14 986,109,441 and ViT-L-14 427,616,513,
  counted with open_clip.create_model(name, device="meta")); other open_clip names are counted the
  same way on demand; the miniature reward from its safetensors header.

What the counts give: SD3.5-medium's MMDiT-X has 2,243,171,520 parameters (2.24 B; "2.5 B" in
Stability's announcement), FLUX.1-dev's transformer 11,901,408,320 (11.9 B), SD1.5's UNet
859,520,964, Qwen-Image's transformer 20,430,401,088 (20.4 B; "20B" in Qwen's announcement).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from treegrpo_ray.config import ConfigError

HUB_CONFIGS = Path(__file__).parent / "hub_configs"
DENOISER_CLASSES = {"StableDiffusion3Pipeline": ("transformer", "SD3Transformer2DModel", "sd3"),
                    "FluxPipeline": ("transformer", "FluxTransformer2DModel", "flux"),
                    "StableDiffusionPipeline": ("unet", "UNet2DConditionModel", "sd15"),
                    "QwenImagePipeline": ("transformer", "QwenImageTransformer2DModel", "qwenimage"),
                    "WanPipeline": ("transformer", "WanTransformer3DModel", "wan")}
CLIP_L_PROJ = ("CLIP-L/14 text", 123_650_304)      # CLIPTextModelWithProjection (SD3 text_encoder)
CLIP_L = ("CLIP-L/14 text", 123_060_480)           # CLIPTextModel (FLUX, SD1.5)
CLIP_BIGG = ("OpenCLIP bigG/14 text", 694_659_840)  # CLIPTextModelWithProjection (SD3 text_encoder_2)
T5_XXL = ("T5-v1.1-XXL encoder", 4_762_310_656)    # T5EncoderModel (SD3 text_encoder_3, FLUX text_encoder_2)
VAE_16CH = 83_819_683                              # AutoencoderKL, 16 latent channels, no quant convs
VAE_SD1 = 83_653_863                               # AutoencoderKL, 4 latent channels
QWEN25_VL_7B = ("Qwen2.5-VL-7B", 8_292_166_656)    # Qwen2_5_VLForConditionalGeneration, vision tower + lm_head included
VAE_QWEN = 126_892_531                             # AutoencoderKLQwenImage (base_dim 96, z_dim 16)
UMT5_XXL = ("UMT5-XXL encoder", 5_680_910_336)     # UMT5EncoderModel (Wan2.1 text_encoder)
VAE_WAN = 126_892_531                              # AutoencoderKLWan (Wan2.1), 16 latent channels


@dataclass(frozen=True)
class HubModel:
    pipeline: str
    denoiser_config: str                           # file in plan/hub_configs/
    text_encoders: tuple[tuple[str, int], ...]
    vae_params: int
    vae: tuple[int, int, int] = (128, 8, 0)        # (VAE width at full resolution, spatial factor, temporal factor)


HUB_MODELS = {
    "stabilityai/stable-diffusion-3.5-medium": HubModel("StableDiffusion3Pipeline", "sd35_medium.json",
                                                        (CLIP_L_PROJ, CLIP_BIGG, T5_XXL), VAE_16CH),
    "black-forest-labs/FLUX.1-dev": HubModel("FluxPipeline", "flux1_dev.json", (CLIP_L, T5_XXL), VAE_16CH),
    "stable-diffusion-v1-5/stable-diffusion-v1-5": HubModel("StableDiffusionPipeline", "sd15.json", (CLIP_L,), VAE_SD1),
    "runwayml/stable-diffusion-v1-5": HubModel("StableDiffusionPipeline", "sd15.json", (CLIP_L,), VAE_SD1),
    "Qwen/Qwen-Image": HubModel("QwenImagePipeline", "qwen_image.json", (QWEN25_VL_7B,), VAE_QWEN, (96, 8, 0)),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": HubModel("WanPipeline", "wan21_t2v_1p3b.json", (UMT5_XXL,), VAE_WAN,
                                                 (96, 8, 4)),
}
HUB_VAE = {"vae_scale_factor": 8, "clip_tokens": 77}  # all of them: 8x downsampling; SD's CLIP: 77 tokens


@dataclass(frozen=True)
class RewardFacts:
    """A scorer's size and its vision tower's activation shape (tokens x width per image)."""
    params: int
    tokens: int
    width: int


REWARD_MODELS = {"ViT-H-14": RewardFacts(986_109_441, 257, 1280), "ViT-L-14": RewardFacts(427_616_513, 257, 1024)}
REWARD_MODELS["ViT-L-14-quickgelu"] = REWARD_MODELS["ViT-L-14"]  # OpenAI's weights: the same sizes
# ImageReward v1.0 (BLIP ViT-L/16 at 224 + med BERT-base + MLP): counted from rewards/imagereward.py's
# model on the meta device (real_configs(), vocabulary 30524)
REWARD_MODELS["imagereward"] = RewardFacts(446_206_689, 197, 1024)
REWARD_DEFAULT_MODEL = {"hpsv2": "ViT-H-14", "clipscore": "ViT-L-14-quickgelu", "aesthetic": "ViT-L-14-quickgelu",
                        "pickscore": "ViT-H-14", "imagereward": "imagereward"}


@dataclass(frozen=True)
class ModelFacts:
    """The numbers the plan needs about one pipeline."""
    pretrained: str
    source: str                                    # where the numbers come from, for the report
    family: str                                    # sd3 | flux | sd15 | qwenimage
    denoiser_class: str
    denoiser_params: int
    lora_params: int                               # trainable parameters of the configured LoRA (0: full fine-tune)
    text_encoders: tuple[tuple[str, int], ...]
    vae_params: int
    vae_channels: int                              # block_out_channels[0] (Qwen-Image: base_dim): full-resolution width
    vae_scale_factor: int
    latent_channels: int
    width: int                                     # transformer hidden size | UNet sum_i channels_i / 4^i
    heads: int                                     # attention heads per block (UNet: at its first level)
    layers: int                                    # transformer blocks (FLUX: double + single) | UNet layers_per_block
    dual_layers: int                               # SD3.5 MMDiT-X blocks with a second image attention
    token_patch: int                               # latent pixels per token side (SD3: patch 2; FLUX, Qwen: 2x2 packing)
    clip_tokens: int                               # CLIP tokenizer length (SD3's context = this + T5 tokens)
    guidance_distilled: bool                       # FLUX.1-dev: guidance embedding, no CFG batch
    vae_scale_factor_temporal: int = 0             # video (Wan): frames per latent frame; 0 for image models


def meta_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields tied tensors once


def lora_count(module: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters peft adds for LoraConfig(r=rank, target_modules=targets): a module matches when its
    qualified name equals a target or ends with "." + target (peft's rule for a list of names);
    Linear: A (r x in) + B (out x r); Conv2d: A (r x in x kh x kw) + B (out x r)."""
    total = 0
    for name, mod in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(mod, torch.nn.Linear):
            total += rank * (mod.in_features + mod.out_features)
        elif isinstance(mod, torch.nn.Conv2d):
            kh, kw = mod.kernel_size
            total += rank * (mod.in_channels // mod.groups * kh * kw) + mod.out_channels * rank
    return total


def _on_meta(build):
    with torch.device("meta"):
        return build()


def meta_denoiser(cls_name: str, config: dict) -> torch.nn.Module:
    import diffusers
    cls = getattr(diffusers, cls_name)
    return _on_meta(lambda: cls.from_config(config))


def _local_component_params(root: Path, sub: str, library: str, cls_name: str) -> int:
    if library == "transformers":
        import transformers
        cls = getattr(transformers, cls_name)
        cfg = cls.config_class.from_pretrained(str(root / sub))
        return meta_count(_on_meta(lambda: cls._from_config(cfg)))
    import diffusers
    cls = getattr(diffusers, cls_name)
    return meta_count(_on_meta(lambda: cls.from_config(cls.load_config(str(root / sub)))))


def vae_geometry(vae_cfg: dict) -> tuple[int, int]:
    """(full-resolution channel width, pixels per latent side) of a VAE config: AutoencoderKL's
    block_out_channels[0]; Qwen-Image's 3-D VAE its base_dim. The scale factor is the policy's."""
    from treegrpo_ray.models.policy import vae_scale_factor_of
    width = vae_cfg.get("base_dim", 96) if "temperal_downsample" in vae_cfg else vae_cfg["block_out_channels"][0]
    return width, vae_scale_factor_of(vae_cfg)


def pipeline_dir(pretrained: str) -> Path | None:
    """The local diffusers directory `pretrained` names ('miniature' = the shipped one), or None."""
    if pretrained == "miniature":
        from treegrpo_ray.miniature import PIPELINE_DIR
        return Path(PIPELINE_DIR)
    p = Path(pretrained).expanduser()
    return p if (p / "model_index.json").is_file() else None


def denoiser_shape(family: str, cfg) -> tuple[int, int, int, int, int, int]:
    """(width, heads, layers, dual_layers, token_patch, latent_channels) of a denoiser config, as
    ModelFacts describes them."""
    if family == "sd3":
        width, layers, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers, cfg.num_attention_heads
        dual, patch, latent = len(cfg.dual_attention_layers or ()), cfg.patch_size, cfg.in_channels
    elif family in ("flux", "qwenimage"):
        width, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads
        layers = cfg.num_layers + getattr(cfg, "num_single_layers", 0)  # Qwen-Image: all 60 blocks dual-stream
        dual, patch, latent = 0, 2, cfg.in_channels // 4     # 2x2 packing: in_channels = 4 x latent channels
    elif family == "wan":  # tokens: latent frames x (h/2) x (w/2); the text only enters through cross-attention
        width, layers, heads = cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_layers, cfg.num_attention_heads
        dual, patch, latent = 0, cfg.patch_size[1], cfg.in_channels
    else:
        # a UNet's activations: level i holds (pixels / 4^i) x block_out_channels[i] per layer, so
        # its "width" is sum_i channels_i / 4^i in units of the top level's pixels
        width = round(sum(c / 4 ** i for i, c in enumerate(cfg.block_out_channels)))
        layers, dual, patch, latent = cfg.layers_per_block, 0, 1, cfg.in_channels
        head_dim = cfg.attention_head_dim  # SD1.x configs name the head count attention_head_dim
        heads = cfg.num_attention_heads or (head_dim[0] if isinstance(head_dim, (list, tuple)) else head_dim)
    return width, heads, layers, dual, patch, latent


def model_facts(pretrained: str, *, lora_rank: int, lora_targets: tuple[str, ...]) -> ModelFacts:
    """Counts and shapes for `model.pretrained` (see the module docstring for the sources)."""
    root = pipeline_dir(pretrained)
    if root is not None:
        index = json.loads((root / "model_index.json").read_text())
        pipe = index.get("_class_name")
        source = f"{root} (configs on the meta device)"
    elif pretrained in HUB_MODELS:
        hub = HUB_MODELS[pretrained]
        index, pipe = None, hub.pipeline
        source = f"plan/hub_configs/{hub.denoiser_config} (published config) + published text-encoder/VAE counts"
    else:
        raise ConfigError(f"model.pretrained: {pretrained!r} is neither a local diffusers directory (with "
                          f"model_index.json) nor one of the hub ids the plan knows ({', '.join(HUB_MODELS)}); "
                          "point it at a local copy of the pipeline (its config files are enough; no weights are read)")
    if pipe not in DENOISER_CLASSES:
        raise ConfigError(f"model.pretrained: {pretrained!r} is a {pipe}; the plan knows {', '.join(DENOISER_CLASSES)}"
                          "; use one of those pipelines")
    sub, cls_name, family = DENOISER_CLASSES[pipe]
    if root is not None:
        config = json.loads((root / sub / "config.json").read_text())
        cls_name = config.get("_class_name", cls_name)
    else:
        config = json.loads((HUB_CONFIGS / HUB_MODELS[pretrained].denoiser_config).read_text())
    model = meta_denoiser(cls_name, config)
    cfg = model.config
    if root is not None:
        encoders = tuple((f"{k} ({v[1]})", _local_component_params(root, k, v[0], v[1])) for k, v in sorted(index.items())
                         if k.startswith("text_encoder") and isinstance(v, list) and v[0] is not None)
        vae_cfg = json.loads((root / "vae" / "config.json").read_text()) if (root / "vae" / "config.json").is_file() else None
        vae_params = (_local_component_params(root, "vae", "diffusers", vae_cfg.get("_class_name", "AutoencoderKL"))
                      if vae_cfg else 0)
        vae_channels, vae_factor = vae_geometry(vae_cfg) if vae_cfg else (0, 8)
        temporal = int(vae_cfg.get("scale_factor_temporal", 0)) if vae_cfg and family == "wan" else 0
        tok = root / "tokenizer" / "tokenizer_config.json"
        clip_tokens = int(json.loads(tok.read_text()).get("model_max_length", 77)) if tok.is_file() else 77
    else:
        hub = HUB_MODELS[pretrained]
        encoders, vae_params = hub.text_encoders, hub.vae_params
        vae_channels, vae_factor, temporal = hub.vae
        clip_tokens = HUB_VAE["clip_tokens"]
    width, heads, layers, dual, patch, latent = denoiser_shape(family, cfg)
    return ModelFacts(
        pretrained=pretrained, source=source, family=family, denoiser_class=cls_name,
        denoiser_params=meta_count(model), lora_params=lora_count(model, lora_rank, lora_targets) if lora_rank else 0,
        text_encoders=encoders, vae_params=vae_params, vae_channels=vae_channels, vae_scale_factor=vae_factor,
        latent_channels=latent, width=width, heads=heads, layers=layers, dual_layers=dual, token_patch=patch,
        clip_tokens=clip_tokens, guidance_distilled=bool(getattr(cfg, "guidance_embeds", False)),
        vae_scale_factor_temporal=temporal)


def _safetensors_params(path: Path) -> int:
    """Element count of every tensor in a .safetensors file, from its JSON header (no tensor is read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, meta in header.items():
        if name != "__metadata__":
            n = 1
            for d in meta["shape"]:
                n *= d
            total += n
    return total


def reward_facts(name: str, model_name: str = "", checkpoint: str = "") -> RewardFacts:
    """Size of one reward term's model (0 for the JPEG rewards and miniature_colour: pixel arithmetic)."""
    if name.startswith("jpeg") or name == "miniature_colour":
        return RewardFacts(0, 0, 0)
    if name == "miniature":
        from treegrpo_ray.miniature import REWARD_DIR
        path = Path(checkpoint or REWARD_DIR) / "open_clip_model.safetensors"
        return RewardFacts(_safetensors_params(path) if path.is_file() else 0, 0, 0)
    arch = model_name or REWARD_DEFAULT_MODEL.get(name, "")
    if arch in REWARD_MODELS:
        return REWARD_MODELS[arch]
    if not arch:
        raise ConfigError(f"rewards.terms: {name} has no model_name; the plan cannot size it; set model_name, e.g. ViT-H-14")
    import open_clip
    model = open_clip.create_model(arch, pretrained=None, device="meta")
    vis = model.visual
    size = vis.image_size[0] if isinstance(vis.image_size, (tuple, list)) else vis.image_size
    patch = vis.patch_size[0] if isinstance(getattr(vis, "patch_size", 14), (tuple, list)) else getattr(vis, "patch_size", 14)
    width = getattr(vis, "transformer", None).width if hasattr(vis, "transformer") else 0
    return RewardFacts(meta_count(model), (size // patch) ** 2 + 1, width)
