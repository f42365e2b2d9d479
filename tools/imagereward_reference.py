"""Record what the `image-reward` package's own code scores, for tests/test_rewards_imagereward.py.

The package (1.5) cannot be a dependency: it pins timm 0.6.13 and fairscale 0.4.13, its
`__init__` imports OpenAI's `clip` and its training code (`datasets`), and its BERT was written for
transformers 4. So this script runs it once, from a separate install, on a tiny random ImageReward
built by the package's own classes, and writes into tests/data/imagereward/:
  ImageReward.pt   the tiny model's state_dict, saved as the released checkpoint is (torch.save)
  vocab/vocab.txt  a 42-token BERT vocabulary (bert-base-uncased's layout: [PAD] 0, [UNK], [CLS], [SEP], [MASK])
  cases.pt         prompts, the images (uint8 HWC, some non-square, one RGBA), the package's
                   preprocessed pixels and token ids, and its scores: `score(prompt, PIL)` per
                   pair and `score_gard(ids, mask, pixels)` on the batch
  configs.json     the tiny architecture (the only thing that differs from the released model)

    pip download image-reward==1.5 fairscale==0.4.13 --no-deps -d wheels
    pip install --no-deps --target /tmp/ir_site wheels/*
    python -m tools.imagereward_reference --site /tmp/ir_site

Only construction is patched (ViT size, preprocessing size, MLP input width, the tokenizer's
vocabulary file, as `init_tokenizer` would download bert-base-uncased); every forward path is the
package's. Shims for transformers 5 re-add what its BERT imports from transformers 4
(apply_chunking_to_forward, prune_linear_layer, find_pruneable_heads_and_indices,
get_head_mask, invert_attention_mask, and post_init before init_weights), with their v4 behaviour.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "imagereward"
VOCAB = ["[PAD]", "[unused0]", "[unused1]", "[unused2]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "an", "the", "of",
         "in", "on", "at", "with", "and", "cat", "dog", "photo", "picture", "red", "blue", "green", "sky", "tree",
         "house", "man", "woman", "sitting", "standing", "beautiful", "painting", "##s", "##ing", "##ed", ",", ".",
         "!", "?"]
TINY = {"image_size": 32, "patch_size": 16, "vision_width": 32, "vision_layers": 2, "vision_heads": 2,
        "text_hidden": 32, "text_layers": 2, "text_heads": 2, "text_intermediate": 64}
PROMPTS = ["A red cat sitting on the tree.", "paintings of blue skies with a dog and a man, beautiful painting of a "
           "green house", "a " * 60 + "dog", "photo", "the man and the woman standing in the house"]
SIZES = [(40, 56, 3), (64, 48, 3), (32, 32, 3), (100, 37, 3), (50, 70, 4)]


def _shim_transformers_4_api(med) -> None:
    from transformers.modeling_utils import PreTrainedModel

    def invert_attention_mask(self, mask):
        ext = (mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]).to(self.dtype)
        return (1.0 - ext) * torch.finfo(self.dtype).min

    def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
        assert head_mask is None
        return [None] * num_hidden_layers

    def init_weights(self):
        if not hasattr(self, "all_tied_weights_keys"):
            self.post_init()
        PreTrainedModel.init_weights(self)

    med.BertPreTrainedModel.invert_attention_mask = invert_attention_mask
    med.BertPreTrainedModel.get_head_mask = get_head_mask
    med.BertPreTrainedModel.init_weights = init_weights


def _no_pruning(*args):
    raise NotImplementedError("head pruning: not used by ImageReward's score")


def _import_package(site: Path):
    """The package's model modules without its __init__ (which imports clip and the training code)."""
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu
    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        mu.find_pruneable_heads_and_indices = _no_pruning
    sys.path.insert(0, str(site))
    for name, path in (("ImageReward", site / "ImageReward"), ("ImageReward.models", site / "ImageReward" / "models")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    med = importlib.import_module("ImageReward.models.BLIP.med")
    _shim_transformers_4_api(med)
    return tuple(importlib.import_module(f"ImageReward.{m}") for m in ("ImageReward", "models.BLIP.blip_pretrain",
                                                                         "models.BLIP.vit"))


def write_vocab(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return directory


def tokenizer(directory: Path):
    from transformers import BertTokenizer
    tok = BertTokenizer.from_pretrained(str(directory))
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tok.enc_token_id = (getattr(tok, "additional_special_tokens_ids", None) or tok.extra_special_tokens_ids)[0]
    return tok


def build_reference(site: Path, vocab_dir: Path, med_config: Path):
    irmod, bp, vit = _import_package(site)
    t = TINY
    bp.create_vit = lambda *a, **k: (vit.VisionTransformer(img_size=t["image_size"], patch_size=t["patch_size"],
                                                           embed_dim=t["vision_width"], depth=t["vision_layers"],
                                                           num_heads=t["vision_heads"], drop_path_rate=0.1),
                                     t["vision_width"])
    bp.init_tokenizer = lambda: tokenizer(vocab_dir)
    transform, mlp = irmod._transform, irmod.MLP
    irmod._transform = lambda n_px: transform(t["image_size"])
    irmod.MLP = lambda input_size: mlp(t["text_hidden"])
    return irmod.ImageReward(med_config=str(med_config), device="cpu").eval()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", type=Path, required=True, help="where image-reward 1.5 (+ fairscale) is installed")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    from PIL import Image
    out = args.out
    vocab_dir = write_vocab(out / "vocab")
    t = TINY
    med = {"architectures": ["BertModel"], "hidden_act": "gelu", "hidden_size": t["text_hidden"],
           "intermediate_size": t["text_intermediate"], "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
           "model_type": "bert", "num_attention_heads": t["text_heads"], "num_hidden_layers": t["text_layers"],
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(VOCAB) + 2, "encoder_width": t["vision_width"],
           "add_cross_attention": True, "attention_probs_dropout_prob": 0.1, "hidden_dropout_prob": 0.1}
    (out / "configs.json").write_text(json.dumps(TINY, indent=1) + "\n")
    med_path = out / "med_config.json"
    med_path.write_text(json.dumps(med, indent=1) + "\n")
    torch.manual_seed(0)
    ref = build_reference(args.site, vocab_dir, med_path)
    with torch.no_grad():  # spread every weight out (LayerNorms near 1) so each part of the forward matters
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 0.3)
                    + (1.0 if "norm" in name.lower() and name.endswith("weight") else 0.0))
        for layer in ref.mlp.layers:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.copy_(torch.randn_like(layer.weight) / layer.in_features ** 0.5)
    torch.save(ref.state_dict(), out / "ImageReward.pt")
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, size, dtype=np.uint8) for size in SIZES]
    pils = [Image.fromarray(a, "RGBA" if a.shape[2] == 4 else "RGB") for a in images]
    tok = ref.blip.tokenizer
    with torch.no_grad():
        score_pil = [float(ref.score(p, im)) for p, im in zip(PROMPTS, pils)]
        pixels = torch.stack([ref.preprocess(im) for im in pils])
        text = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        score_gard = ref.score_gard(text.input_ids, text.attention_mask, pixels)[:, 0]
    torch.save({"prompts": PROMPTS, "images": [torch.from_numpy(a) for a in images], "pixels": pixels,
                "ids": text.input_ids, "mask": text.attention_mask, "score_pil": torch.tensor(score_pil),
                "score_gard": score_gard}, out / "cases.pt")
    print(f"wrote {out}: score(prompt, PIL) = {[round(s, 4) for s in score_pil]}")


if __name__ == "__main__":
    main()
