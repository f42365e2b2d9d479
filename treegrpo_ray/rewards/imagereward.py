"""ImageReward v1.0 (Xu et al. 2023, github.com/THUDM/ImageReward; the TreeGRPO paper's
ImageReward metric, r_max = 2) on transformers' BLIP classes, loading the published `ImageReward.pt`.

The model, as the `image-reward` package's `ImageReward.score` computes it (facts read from its
code, version 1.5): a BLIP ViT-L/16 at 224 px (width 1024, 24 layers, 16 heads, LayerNorm eps 1e-6)
gives all 197 image tokens after its final norm; BLIP's "med" BERT-base (768, 12 layers, no
token-type embeddings) reads the prompt, bidirectionally, with cross-attention to every image token
in every layer; the [CLS] position's output goes through an MLP (768-1024-128-64-16-1, no
activations) in float32; score = (r - 0.16717362830052426) / 1.0333394966054072. The prompt is
tokenised by bert-base-uncased with [DEC] (bos) and [ENC] added (vocabulary 30524),
padding="max_length", truncation, max_length 35. Images: bicubic resize of the short side to 224,
centre crop, OpenAI CLIP mean/std.

transformers' BlipVisionModel and BlipTextModel are the same networks under other key names:
`convert_state_dict` maps them (timm-style ViT keys to BlipVisionModel's; the med BERT's keys are
BlipTextModel's unchanged). Unused by the score and dropped: blip.vision_proj / text_proj (the
contrastive heads) and the position_ids buffer. tests/test_rewards_imagereward.py holds our scores
equal to the package's own code's, recorded by tools/imagereward_reference.py (the package cannot
live beside our stack: it pins timm 0.6.13 and fairscale 0.4.13 and its BERT needs transformers 4).

Departure from the package: images come as tensors (torch's antialiased bicubic, no uint8 round
trip) instead of PIL images; a test bounds the gap.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from treegrpo_ray.rewards.aesthetic import mlp_head
from treegrpo_ray.rewards.open_clip_loader import load_state_dict, locate_dir, preprocess_images, resolve_checkpoint
from treegrpo_ray.rewards.scorers import Scorer

MODEL_REPO, MODEL_FILE = "THUDM/ImageReward", "ImageReward.pt"
TOKENIZER_REPO = "bert-base-uncased"
MEAN, STD = 0.16717362830052426, 1.0333394966054072    # the package's normalisation of the MLP output
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
MAX_TEXT_LEN = 35

_VISION_KEYS = [  # ImageReward.pt's blip.visual_encoder.<key> -> BlipVisionModel's
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm([12])\.(weight|bias)", r"encoder.layers.\1.layer_norm\2.\3"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)", r"encoder.layers.\1.mlp.fc\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]
_UNUSED = ("blip.vision_proj.", "blip.text_proj.", "blip.text_encoder.embeddings.position_ids",
           "blip.text_encoder.pooler.", "blip.itm_head.")


def real_configs(vocab_size: int = 30524):
    """BlipVisionConfig / BlipTextConfig of the released ImageReward v1.0 (BLIP ViT-L/16 + med BERT-base)."""
    from transformers.models.blip import BlipTextConfig, BlipVisionConfig
    vision = BlipVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6,
                              attention_dropout=0.0)
    text = text_config(vocab_size, hidden=768, layers=12, heads=12, intermediate=3072, encoder_width=1024)
    return vision, text


def text_config(vocab_size: int, *, hidden: int, layers: int, heads: int, intermediate: int, encoder_width: int):
    """The med BERT as BlipTextConfig: is_decoder=True only makes transformers build the
    cross-attention layers; the forward passes is_decoder=False (bidirectional self-attention)."""
    from transformers.models.blip import BlipTextConfig
    return BlipTextConfig(vocab_size=vocab_size, hidden_size=hidden, encoder_hidden_size=encoder_width,
                          intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                          max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, is_decoder=True,
                          bos_token_id=None, eos_token_id=None, sep_token_id=None)  # the score uses none of them


class ImageRewardModel(torch.nn.Module):
    def __init__(self, vision_config, text_config):
        super().__init__()
        from transformers.models.blip import BlipTextModel, BlipVisionModel
        if text_config.encoder_hidden_size != vision_config.hidden_size:
            raise ValueError("the text model's cross-attention width must be the vision model's")
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = mlp_head((text_config.hidden_size, 1024, 128, 64, 16, 1))  # the aesthetic predictor's layout

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """pixels (B, 3, S, S) normalised; ids, mask (B, 35) -> (B,) float32 normalised rewards."""
        image = self.vision(pixel_values=pixels).last_hidden_state                        # (B, 1 + patches, W)
        out = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image,
                        encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long, device=image.device),
                        is_decoder=False)
        reward = self.mlp(out.last_hidden_state[:, 0, :].float())[:, 0]                  # [CLS]; head in float32
        return (reward - MEAN) / STD


def convert_state_dict(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """ImageReward.pt's keys -> ImageRewardModel's; a key of neither kind is an error naming it."""
    out, unknown = {}, []
    for key, value in state.items():
        if key.startswith(_UNUSED):
            continue
        if key.startswith("blip.visual_encoder."):
            rest = key[len("blip.visual_encoder."):]
            rule = next(((p, r) for p, r in _VISION_KEYS if re.fullmatch(p, rest)), None)
            if rule is None:
                unknown.append(key)
                continue
            out["vision." + re.sub(rule[0], rule[1], rest)] = value
        elif key.startswith("blip.text_encoder."):
            out["text." + key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp.layers."):
            out["mlp." + key[len("mlp.layers."):]] = value.float()
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"'{source}' is not an ImageReward checkpoint: {len(unknown)} unknown keys "
                         f"(e.g. {unknown[:3]})")
    return out


def make_tokenizer(directory: str, hf_cache_dir=None):
    """bert-base-uncased with [DEC] as bos and [ENC] as an additional special token (BLIP's recipe)."""
    from transformers import BertTokenizer
    tokenizer = BertTokenizer.from_pretrained(directory, local_files_only=True, cache_dir=hf_cache_dir)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def locate(checkpoint=None, processor=None, hf_cache_dir=None) -> tuple[Path, str]:
    ckpt = resolve_checkpoint(checkpoint or None, what="ImageReward checkpoint",
                              hint=f"Download it once with `hf download {MODEL_REPO} {MODEL_FILE}` and pass its path "
                                   "as the reward's checkpoint, or leave it in the Hugging Face cache.",
                              hf_repo=MODEL_REPO, hf_filename=MODEL_FILE, hf_cache_dir=hf_cache_dir)
    tokenizer = locate_dir(processor, TOKENIZER_REPO, "ImageReward's tokenizer (bert-base-uncased)",
                           f"Download it once with `hf download {TOKENIZER_REPO} vocab.txt tokenizer_config.json` "
                           "and pass the directory as the reward's processor, or leave it in the Hugging Face cache.",
                           hf_cache_dir, markers=("vocab.txt", "tokenizer.json"))
    return ckpt, tokenizer


class ImageRewardScorer(Scorer):
    """ImageReward v1.0. `checkpoint`: ImageReward.pt; `processor`: the bert-base-uncased tokenizer
    directory; either left empty is taken from the Hugging Face cache. `configs` (vision, text)
    replaces the released architecture (tests' tiny models); the loading path is the same."""

    name = "imagereward"

    def __init__(self, checkpoint: str | Path | None = None, *, processor: str | Path | None = None, configs=None,
                 device="cpu", dtype: torch.dtype = torch.float32, batch_size: int = 16,
                 hf_cache_dir: str | Path | None = None):
        super().__init__(batch_size)
        path, tokenizer_dir = locate(checkpoint, processor, hf_cache_dir)
        self.tokenizer = make_tokenizer(tokenizer_dir, hf_cache_dir)
        vision, text = configs if configs is not None else real_configs(len(self.tokenizer))
        state = convert_state_dict(load_state_dict(path), str(path))
        words = state.get("text.embeddings.word_embeddings.weight")
        if words is not None and words.shape[0] != len(self.tokenizer):
            raise ValueError(f"'{path}' has {words.shape[0]} word embeddings but the tokenizer in '{tokenizer_dir}' "
                             f"has {len(self.tokenizer)} tokens (bert-base-uncased + [DEC] + [ENC] = 30524)")
        model = ImageRewardModel(vision, text)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"'{path}' does not fit ImageReward's architecture: {str(e).splitlines()[0]} "
                             f"{str(e).splitlines()[1] if len(str(e).splitlines()) > 1 else ''}") from None
        self.model = model.to(device).eval().requires_grad_(False)
        self.model.vision.to(dtype)
        self.model.text.to(dtype)
        self.device, self.dtype, self.size = torch.device(device), dtype, vision.image_size
        self.mean, self.std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def tokens(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), each (B, 35), each prompt tokenised once."""
        for p in dict.fromkeys(prompts):
            if p not in self._tokens:
                t = self.tokenizer([p], padding="max_length", truncation=True, max_length=MAX_TEXT_LEN,
                                   return_tensors="pt")
                self._tokens[p] = (t.input_ids[0], t.attention_mask[0])
        return (torch.stack([self._tokens[p][0] for p in prompts]).to(self.device),
                torch.stack([self._tokens[p][1] for p in prompts]).to(self.device))

    @torch.no_grad()
    def _score(self, images, prompts):
        pixels = preprocess_images(images.float().cpu(), (self.size, self.size), self.mean, self.std)
        ids, mask = self.tokens(prompts)
        return self.model(pixels.to(self.device, self.dtype), ids, mask)
