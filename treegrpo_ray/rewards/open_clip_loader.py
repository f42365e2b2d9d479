"""Shared loading of open_clip models for the CLIP-family rewards (HPSv2.x, CLIPScore, the miniature,
the aesthetic predictor), and where every reward finds its files (resolve_checkpoint, locate_dir).

One code path serves a real model and a test's tiny one: the architecture comes from an open_clip
model name (``"ViT-H-14"``) OR a custom config (a dict, or a JSON file holding the dict or
``{"model_cfg": ..., "preprocess_cfg": ...}`` as open_clip's ``local-dir`` format does); the
weights come from a local checkpoint file. Only the architecture differs between production and
tests, never the loading, preprocessing or scoring code.

Safety / offline rules:
* checkpoints load with ``safetensors`` or ``torch.load(weights_only=True)`` -- never a full
  unpickle; a pickle holding objects other than tensors/containers is refused with advice;
* nothing is downloaded: a missing file raises FileNotFoundError naming the file and the command
  that fetches it; a Hugging Face repo file is also looked up in the local HF cache (no network).

Preprocessing is open_clip's inference transform (``image_transform(is_train=False)``, resize mode
"shortest": resize the short side to the model size with bicubic interpolation, center-crop,
normalise with the config's mean/std) written with torch ops on (B, 3, H, W) tensors in [0, 1].
Departures: no uint8 quantisation between resize and normalise (PIL's path rounds to 1/255), and
torch's antialiased bicubic differs from PIL's by ~1/255 per pixel (a test bounds the gap).
"""
from __future__ import annotations

import copy
import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# OpenAI's CLIP ViT-L/14 as open_clip publishes it (its pretrained tag "openai"; QuickGELU): the
# default CLIP of CLIPScore (as torchmetrics') and the one the LAION aesthetic predictor reads
OPENAI_L14_REPO = "timm/vit_large_patch14_clip_224.openai"
OPENAI_L14_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPENAI_L14_MODEL = "ViT-L-14-quickgelu"
MARKERS = ("config.json", "preprocessor_config.json", "processor_config.json")  # a model's or a processor's directory


# ----------------------------------------------------------------------------- checkpoints
def resolve_checkpoint(path: str | Path | None, *, what: str, hint: str, hf_repo: str | None = None,
                       hf_filename: str | None = None, hf_cache_dir: str | Path | None = None) -> Path:
    """Return an existing local checkpoint path: `path` if given, else the HF-cache copy of
    hf_repo/hf_filename. Never downloads; raises FileNotFoundError naming the file and `hint`."""
    if path is not None:
        p = Path(path).expanduser()
        if p.is_file():
            return p
        raise FileNotFoundError(f"{what} not found at '{p}'. {hint}")
    if hf_repo is not None and hf_filename is not None:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hf_repo, hf_filename, cache_dir=hf_cache_dir)
        if isinstance(cached, str) and Path(cached).is_file():
            return Path(cached)
        where = f"the Hugging Face cache ({hf_cache_dir or 'default HF_HUB_CACHE'})"
        raise FileNotFoundError(f"{what} '{hf_filename}' was not given as a path and is not in {where}; "
                                f"nothing is downloaded at run time. {hint}")
    raise FileNotFoundError(f"{what}: no checkpoint path given. {hint}")


def locate_dir(path: str | Path | None, repo: str, what: str, hint: str, hf_cache_dir=None,
               markers: tuple[str, ...] = MARKERS) -> str:
    """A local transformers directory (with one of `markers`), else `repo` when
    its snapshot is in the Hugging Face cache; FileNotFoundError naming what is missing otherwise.
    Nothing is downloaded."""
    if path:
        p = Path(path).expanduser()
        if p.is_dir() and any((p / f).is_file() for f in markers):
            return str(p)
        raise FileNotFoundError(f"{what} not found at '{p}' (a directory with one of {', '.join(markers)}). {hint}")
    from huggingface_hub import try_to_load_from_cache
    for f in markers:
        cached = try_to_load_from_cache(repo, f, cache_dir=hf_cache_dir)
        if isinstance(cached, str) and Path(cached).is_file():
            return repo
    raise FileNotFoundError(f"{what} was not given as a directory and '{repo}' is not in the Hugging Face cache "
                            f"({hf_cache_dir or 'default HF_HUB_CACHE'}); nothing is downloaded at run time. {hint}")


def locate_openai_l14(path: str | Path | None, what: str, hint: str, hf_cache_dir=None) -> Path:
    """OpenAI's ViT-L/14 open_clip weights: `path` if given, else either file name in the HF cache."""
    if path:
        return resolve_checkpoint(path, what=what, hint=hint)
    for name in OPENAI_L14_FILES[:-1]:
        try:
            return resolve_checkpoint(None, what=what, hint=hint, hf_repo=OPENAI_L14_REPO, hf_filename=name,
                                      hf_cache_dir=hf_cache_dir)
        except FileNotFoundError:
            pass
    return resolve_checkpoint(None, what=what, hint=hint, hf_repo=OPENAI_L14_REPO, hf_filename=OPENAI_L14_FILES[-1],
                              hf_cache_dir=hf_cache_dir)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a weights file safely into a CPU state dict: .safetensors via safetensors, .pt/.pth/
    .bin/.ckpt via torch.load(weights_only=True). Unwraps a 'state_dict' entry (HPS checkpoints
    are {'state_dict': ..., ...}) and strips a DDP 'module.' prefix."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        obj = load_file(str(path), device="cpu")
    elif path.suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(f"refusing to unpickle '{path}': it holds objects other than tensors "
                             f"(torch.load(weights_only=True) failed: {str(e).splitlines()[0]}). Re-save its "
                             f"state_dict with safetensors.torch.save_file and pass that file.") from e
    else:
        raise ValueError(f"unknown checkpoint format '{path.suffix}' for '{path}': expected .safetensors "
                         f"or one of {_PICKLE_SUFFIXES}")
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"'{path}' does not hold a state dict of tensors")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


# ----------------------------------------------------------------------------- architecture
def load_model_config(model_name: str | None = None, config: dict | str | Path | None = None) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from exactly one of an open_clip model name or a custom config
    (dict or JSON path). preprocess_cfg holds mean/std/interpolation overrides (may be empty)."""
    import open_clip  # here, not at the top: it costs ~3 CPU-s in a process that has no CLIP model to load
    if (model_name is None) == (config is None):
        raise ValueError("give exactly one of model_name (e.g. 'ViT-H-14') or config (dict or JSON path)")
    if model_name is not None:
        cfg = open_clip.get_model_config(model_name)
        if cfg is None:
            raise ValueError(f"unknown open_clip model name '{model_name}'; known: {open_clip.list_models()}")
        return copy.deepcopy(cfg), {}
    if isinstance(config, (str, Path)):
        cfg_path = Path(config)
        if not cfg_path.is_file():
            raise FileNotFoundError(f"open_clip config file not found: '{cfg_path}'")
        config = json.loads(cfg_path.read_text())
    cfg = copy.deepcopy(dict(config))
    preprocess = dict(cfg.pop("preprocess_cfg", {}) or {})
    if "model_cfg" in cfg:
        cfg = cfg["model_cfg"]
    for key, pkey in (("image_mean", "mean"), ("image_std", "std")):
        if key in cfg:
            preprocess[pkey] = cfg.pop(key)
    if "vision_cfg" not in cfg or "text_cfg" not in cfg or "embed_dim" not in cfg:
        raise ValueError(f"open_clip config needs embed_dim, vision_cfg and text_cfg; got keys {sorted(cfg)}")
    return cfg, preprocess


def build_model(model_cfg: dict) -> torch.nn.Module:
    """Instantiate CLIP / CustomTextCLIP from a config dict with random weights (as open_clip's
    create_model does for pretrained=None; CoCa configs are not supported)."""
    import open_clip
    cfg = copy.deepcopy(model_cfg)
    if "multimodal_cfg" in cfg:
        raise ValueError("CoCa (multimodal_cfg) open_clip models are not supported as reward models")
    text_cfg = cfg["text_cfg"]
    custom_text = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False        # weights come from our checkpoint
    if "timm_model_name" in cfg["vision_cfg"]:
        cfg["vision_cfg"]["timm_model_pretrained"] = False
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    return cls(**cfg)


def build_tokenizer(model_name: str | None, model_cfg: dict):
    import open_clip
    if model_name is not None:
        return open_clip.get_tokenizer(model_name)
    text_cfg = model_cfg["text_cfg"]
    if "hf_tokenizer_name" in text_cfg:
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                               context_length=text_cfg.get("context_length", 77))
    return open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


def load_weights_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict(strict=True) with an error that says which file does not fit and how."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        raise ValueError(f"checkpoint '{source}' does not match the open_clip architecture: "
                         f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:3]}), {len(shape)} shape mismatches (e.g. {shape[:3]}). "
                         f"Check model_name / config against the checkpoint.")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------- model + preprocessing
def preprocess_images(images: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor,
                      interpolation: str = "bicubic") -> torch.Tensor:
    """open_clip's inference transform on tensors: (B, 3, H, W) in [0, 1] -> (B, 3, h, w) normalised.
    Square targets: resize the short side to h (long side int(h * long / short), as torchvision
    Resize(int) does), center-crop with torchvision's rounding. Non-square targets: squash."""
    _, _, H, W = images.shape
    th, tw = size
    if th == tw:
        if H <= W:
            new_h, new_w = th, int(th * W / H)
        else:
            new_h, new_w = int(th * H / W), th
    else:
        new_h, new_w = th, tw
    x = images
    if (new_h, new_w) != (H, W):
        x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, align_corners=False, antialias=True)
        x = x.clamp(0.0, 1.0)                         # PIL output saturates to [0, 255]
    top, left = int(round((new_h - th) / 2.0)), int(round((new_w - tw) / 2.0))
    x = x[:, :, top:top + th, left:left + tw]         # (B, 3, th, tw)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


@dataclass
class OpenClipBundle:
    """A loaded open_clip model with its tokenizer and preprocessing, frozen, on one device."""

    model: torch.nn.Module
    tokenizer: object
    image_size: tuple[int, int]
    mean: torch.Tensor          # (3,) float32 on device
    std: torch.Tensor           # (3,) float32 on device
    interpolation: str
    device: torch.device
    dtype: torch.dtype
    _text_cache: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit-norm float32."""
        x = images.to(self.device, torch.float32)
        x = preprocess_images(x, self.image_size, self.mean, self.std, self.interpolation)
        feats = self.model.encode_image(x.to(self.dtype)).float()
        return F.normalize(feats, dim=-1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """list of B prompts -> (B, D) unit-norm float32. Each distinct prompt is encoded once per
        process and on its own (a batch of one), so its features do not depend on which other
        prompts shared the call: a restarted reward actor scores exactly as its first life did
        (see models/prompts.py)."""
        for p in dict.fromkeys(prompts):
            if p not in self._text_cache:
                tokens = self.tokenizer([p]).to(self.device)                     # (1, context_length)
                self._text_cache[p] = F.normalize(self.model.encode_text(tokens).float(), dim=-1)[0]  # (D,)
        return torch.stack([self._text_cache[p] for p in prompts])             # (B, D)

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Per-pair cosine similarity, the diagonal of image_feats @ text_feats.T -> (B,) float32."""
        return (self.image_features(images) * self.text_features(prompts)).sum(dim=-1)


def load_open_clip(*, checkpoint: str | Path, model_name: str | None = None, config: dict | str | Path | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> OpenClipBundle:
    """Build the architecture (model name or custom config), load `checkpoint` strictly and safely,
    move to device/dtype, freeze. `checkpoint` must be an existing local file (see resolve_checkpoint)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    model_cfg, pre = load_model_config(model_name, config)
    model = build_model(model_cfg)
    load_weights_strict(model, load_state_dict(checkpoint), str(checkpoint))
    device = torch.device(device)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    size = getattr(model.visual, "image_size", model_cfg["vision_cfg"]["image_size"])
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    if pre.get("resize_mode", "shortest") != "shortest" and size[0] == size[1]:
        raise ValueError(f"preprocess resize_mode '{pre['resize_mode']}' is not supported (only 'shortest')")
    mean = torch.tensor(pre.get("mean", OPENAI_DATASET_MEAN), dtype=torch.float32, device=device)
    std = torch.tensor(pre.get("std", OPENAI_DATASET_STD), dtype=torch.float32, device=device)
    interpolation = pre.get("interpolation", "bicubic")
    if interpolation not in ("bicubic", "bilinear"):
        raise ValueError(f"preprocess interpolation must be 'bicubic' or 'bilinear', got '{interpolation}'")
    return OpenClipBundle(model=model, tokenizer=build_tokenizer(model_name, model_cfg), image_size=size,
                          mean=mean, std=std, interpolation=interpolation, device=device, dtype=dtype)
