"""The paper's evaluation metrics beside HPSv2.1 and CLIPScore: the LAION aesthetic predictor and
PickScore, each on tiny random weights saved in its real published format and loaded through the
same code a GPU user runs, checked against the reference computation written out by hand from the
predictor's published code (aesthetic) and run through the model card's own transformers calls
(PickScore), plus the bad inputs: missing files, wrong architectures, wrong shapes, NaN images."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.rewards_fixtures import PROMPTS, TINY_CLIP_CFG, random_images, save_safetensors, tiny_clip
from treegrpo_ray.rewards.aesthetic import AestheticScorer
from treegrpo_ray.rewards.files import locate
from treegrpo_ray.rewards.open_clip_loader import preprocess_images
from treegrpo_ray.rewards.pickscore import PickScoreScorer

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- aesthetic
class PublishedMLP(torch.nn.Module):
    """The improved-aesthetic-predictor's MLP as its repository defines it (a `layers` Sequential:
    Linear, Dropout 0.2, Linear, Dropout 0.2, Linear, Dropout 0.1, Linear, Linear), at tiny widths."""

    def __init__(self, dims=(16, 24, 12, 8, 4)):
        super().__init__()
        d = dims
        self.layers = torch.nn.Sequential(torch.nn.Linear(d[0], d[1]), torch.nn.Dropout(0.2), torch.nn.Linear(d[1], d[2]),
                                          torch.nn.Dropout(0.2), torch.nn.Linear(d[2], d[3]), torch.nn.Dropout(0.1),
                                          torch.nn.Linear(d[3], d[4]), torch.nn.Linear(d[4], 1))

    def forward(self, x):
        return self.layers(x)


@pytest.fixture(scope="module")
def aes(tmp_path_factory):
    d = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(3)
    mlp = PublishedMLP().eval()
    torch.save(mlp.state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")      # the published file's format
    clip = tiny_clip(seed=2)
    return {"mlp": mlp, "clip": clip, "head": d / "sac+logos+ava1-l14-linearMSE.pth",
            "clip_file": save_safetensors(clip, d / "open_clip_model.safetensors")}


def reference_aesthetic(clip, mlp, images):
    """The predictor's published inference: CLIP encode_image, L2-normalise in numpy (a zero norm
    left as 1), the MLP in float32."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    x = preprocess_images(images, (32, 32), torch.tensor(OPENAI_DATASET_MEAN), torch.tensor(OPENAI_DATASET_STD))
    with torch.no_grad():
        emb = clip.encode_image(x).numpy()
    norm = np.atleast_1d(np.linalg.norm(emb, 2, -1))
    norm[norm == 0] = 1
    emb = emb / np.expand_dims(norm, -1)
    with torch.no_grad():
        return mlp(torch.from_numpy(emb).float())[:, 0]


def test_aesthetic_matches_the_published_predictor(aes):
    images = random_images(5, 40, 48)
    scorer = AestheticScorer(aes["head"], clip_checkpoint=aes["clip_file"], model_config=TINY_CLIP_CFG, batch_size=2)
    got = scorer(images, PROMPTS + ["x"])
    torch.testing.assert_close(got, reference_aesthetic(aes["clip"], aes["mlp"], images), atol=1e-5, rtol=0)
    assert got.std() > 1e-4                                   # the images are told apart
    assert torch.equal(got, scorer(images, ["other prompts"] * 5))   # the prompt plays no part


def test_aesthetic_found_in_the_hf_cache_and_missing_files_say_how_to_get_them(aes, tmp_path):
    for repo, name, src in (("models--trl-lib--ddpo-aesthetic-predictor", "aesthetic-model.pth", aes["head"]),
                            ("models--timm--vit_large_patch14_clip_224.openai", "open_clip_model.safetensors",
                             aes["clip_file"])):
        snap = tmp_path / repo / "snapshots" / "r1"
        snap.mkdir(parents=True)
        (tmp_path / repo / "refs").mkdir()
        (tmp_path / repo / "refs" / "main").write_text("r1")
        (snap / name).write_bytes(src.read_bytes())
    images = random_images(3)
    got = AestheticScorer(model_config=TINY_CLIP_CFG, hf_cache_dir=tmp_path)(images, PROMPTS[:3])
    torch.testing.assert_close(got, reference_aesthetic(aes["clip"], aes["mlp"], images), atol=1e-5, rtol=0)
    with pytest.raises(FileNotFoundError, match="(?s)aesthetic predictor head.*hf download trl-lib/ddpo-aesthetic"):
        locate("aesthetic", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError, match="(?s)CLIP ViT-L/14.*not in the Hugging Face cache.*clip_checkpoint"):
        locate("aesthetic", checkpoint=str(aes["head"]), hf_cache_dir=tmp_path / "empty")


def test_aesthetic_refuses_other_architectures_and_bad_images(aes, tmp_path):
    torch.save({"layers.0.weight": torch.zeros(4, 16), "layers.0.bias": torch.zeros(4)}, tmp_path / "short.pth")
    with pytest.raises(ValueError, match="not an improved-aesthetic-predictor head"):
        AestheticScorer(tmp_path / "short.pth", clip_checkpoint=aes["clip_file"], model_config=TINY_CLIP_CFG)
    torch.save(PublishedMLP(dims=(24, 24, 12, 8, 4)).state_dict(), tmp_path / "wide.pth")  # 24-d input, CLIP gives 16
    with pytest.raises(ValueError, match="takes 24-d embeddings but the CLIP"):
        AestheticScorer(tmp_path / "wide.pth", clip_checkpoint=aes["clip_file"], model_config=TINY_CLIP_CFG)
    scorer = AestheticScorer(aes["head"], clip_checkpoint=aes["clip_file"], model_config=TINY_CLIP_CFG)
    images = random_images(3)
    images[1, 0, 3, 3] = float("nan")
    got = scorer(images, PROMPTS[:3])
    assert got.isnan().tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        scorer(torch.rand(2, 1, 32, 32), PROMPTS[:2])


# ----------------------------------------------------------------------------- PickScore
@pytest.fixture(scope="module")
def pick(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tools.tiny_pipelines import tiny_clip_tokenizer
    d = tmp_path_factory.mktemp("pickscore")
    tokenizer = tiny_clip_tokenizer(d / "tok")
    vocab = tokenizer.get_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    torch.manual_seed(5)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16, logit_scale_init_value=3.0))
    model.eval().save_pretrained(d / "PickScore_v1")                     # config.json + model.safetensors
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(d / "processor")
    return {"model": model, "dir": d / "PickScore_v1", "processor": d / "processor"}


def model_card_scores(d, prompt, images):
    """PickScore's model card, step for step: AutoProcessor + AutoModel, PIL images in, unit-norm
    embeddings, logit_scale.exp() * text @ image.T."""
    from transformers import AutoModel, AutoProcessor
    processor, model = AutoProcessor.from_pretrained(d["processor"]), AutoModel.from_pretrained(d["dir"]).eval()
    image_inputs = processor(images=images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs)
        text_embs = model.get_text_features(**text_inputs)
        if not isinstance(image_embs, torch.Tensor):          # transformers 5 returns an output object
            image_embs, text_embs = image_embs.pooler_output, text_embs.pooler_output
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]


def as_pil(images):
    return [Image.fromarray(np.ascontiguousarray((x.permute(1, 2, 0) * 255).round().byte().numpy())) for x in images]


def test_pickscore_matches_its_model_card(pick):
    scorer = PickScoreScorer(pick["dir"], processor=pick["processor"], batch_size=3)
    images = (random_images(4, 40, 48, seed=7) * 255).round() / 255          # exactly representable in uint8
    prompt = "a red circle on the left"
    got = scorer(images, [prompt] * 4)
    ref = model_card_scores(pick, prompt, as_pil(images))
    # the model card feeds PIL images (PIL's bicubic); ours feeds tensors (torch's antialiased bicubic)
    assert float((got - ref).abs().max()) < 0.02 * float(ref.abs().mean())
    # and with the processor's own tensor output it is the card's formula to float precision
    pixels = scorer.processor.image_processor(images=images, do_rescale=False, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = F.normalize(scorer.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    torch.testing.assert_close(got, scorer.scale * img @ scorer.text_features([prompt])[0], atol=1e-5, rtol=0)
    assert abs(scorer.scale - np.exp(3.0)) < 1e-4                            # logit_scale read from the file


def test_pickscore_text_does_not_depend_on_the_other_prompts(pick):
    # a restarted reward actor scores a chunk whose prompt mix differs from its first life's
    alone = torch.stack([PickScoreScorer(pick["dir"], processor=pick["processor"]).text_features([p])[0]
                         for p in PROMPTS])
    fresh = PickScoreScorer(pick["dir"], processor=pick["processor"])
    assert torch.equal(fresh.text_features(PROMPTS[::-1]).flip(0), alone)


def test_pickscore_missing_files_and_bad_images(pick, tmp_path):
    with pytest.raises(FileNotFoundError, match="(?s)PickScore model not found.*hf download yuvalkirstain/PickScore_v1"):
        locate("pickscore", checkpoint=str(tmp_path), processor=str(pick["processor"]))
    with pytest.raises(FileNotFoundError, match="(?s)processor.*laion/CLIP-ViT-H-14-laion2B-s32B-b79K.*not in the Hug"):
        locate("pickscore", checkpoint=str(pick["dir"]), hf_cache_dir=tmp_path)
    scorer = PickScoreScorer(pick["dir"], processor=pick["processor"])
    images = random_images(2)
    images[0] = float("nan")
    assert scorer(images, PROMPTS[:2]).isnan().tolist() == [True, False]
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        scorer(random_images(3), PROMPTS[:2])


# ----------------------------------------------------------------------------- before any cluster
def test_missing_metric_files_stop_the_run_at_preflight(aes, pick, tmp_path, monkeypatch):
    from treegrpo_ray.builders import preflight
    from treegrpo_ray.config import ConfigError, load_config
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))      # an empty cache: nothing is found there
    with pytest.raises(ConfigError, match="(?s)eval_metrics \\(aesthetic\\).*hf download trl-lib/ddpo-aesthetic"):
        preflight(load_config(None, ["eval_metrics=[aesthetic]"]))
    with pytest.raises(ConfigError, match="(?s)rewards.terms.0 \\(pickscore\\): PickScore model.*hf download"):
        preflight(load_config(None, ["rewards.terms.0.name=pickscore"]))
    with pytest.raises(ConfigError, match="rewards.terms.0.clip_checkpoint: '/no/such.safetensors' does not exist"):
        preflight(load_config(None, ["rewards.terms.0.name=aesthetic", "rewards.terms.0.clip_checkpoint=/no/such.safetensors"]))
    # with every file given, preflight passes (no model is loaded there)
    preflight(load_config(None, ["rewards.terms.0.name=aesthetic", f"rewards.terms.0.checkpoint={aes['head']}",
                                 f"rewards.terms.0.clip_checkpoint={aes['clip_file']}"]))
