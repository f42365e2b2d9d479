"""Wan2.1 text-to-video (issue 36): the tiny WanPipeline (tools/tiny_pipelines.build_tiny_wan) loaded
through the production path. Our ODE sampling equals `WanPipeline.__call__` with the same (Euler)
scheduler, re-scoring reproduces the sampler's log-probs over (C, F, h, w) latents, NFE equals
count_nfe, the Wan VAE decode equals the pipeline's own, and short in-process runs train, export
what plain diffusers loads (LoRA and full) and leave eval clips in the run folder.

Sizes: 32x32 pixels x 9 frames -> latents (4, 3, 4, 4); 8 UMT5 tokens."""
import pytest
import torch

from tests.test_families import start_of_update_ratio_error
from treegrpo_ray import driver
from treegrpo_ray.algo.tree import count_nfe
from treegrpo_ray.config import ConfigError, load_config
from treegrpo_ray.models import DiffusionPolicy
from treegrpo_ray.models.families import WanFamily
from treegrpo_ray.sampling.evaluate import ode_sample
from treegrpo_ray.sampling.tree_sampler import TreeSampler

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square and a green triangle"]
FRAMES, SIDE = 9, 32
CALL = dict(height=SIDE, width=SIDE, num_frames=FRAMES, max_sequence_length=8)


@pytest.fixture(scope="module")
def wan(tiny_family_pipelines):
    return tiny_family_pipelines["wan"]


def load(path, **kw):
    return DiffusionPolicy.from_pretrained(path, max_sequence_length=8, resolution=SIDE, num_frames=FRAMES, **kw)


def plain(path):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_family_is_chosen_and_its_latents_are_clips(wan, tiny_family_pipelines):
    policy = load(wan)
    assert type(policy.family).__name__ == "WanFamily" and policy.family.kind == "flow"
    assert policy.latent_shape == (4, 3, 4, 4)            # (C, (9 - 1) // 4 + 1, 32 / 8, 32 / 8)
    assert policy.num_frames == FRAMES
    with pytest.raises(ValueError, match="4k \\+ 1"):
        WanFamily(policy.pipeline, vae_scale_factor=8, guidance_scale=5.0, num_frames=8)
    with pytest.raises(ValueError, match="video pipelines"):  # an image family refuses num_frames
        DiffusionPolicy.from_pretrained(tiny_family_pipelines["sd15"], resolution=16, num_frames=9)


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_ode_sampling_equals_the_plain_diffusers_pipeline(wan, guidance):
    # Schedule (Euler flow sigmas, shift 3), UMT5 encoding, timestep = sigma * 1000, CFG with the
    # empty negative prompt (one [uncond; cond] call here, two calls in the pipeline), Euler steps.
    policy = load(wan, guidance_scale=guidance)
    ours = ode_sample(policy, PROMPTS, num_steps=4, seed=0)
    x0 = torch.randn((2, *policy.latent_shape), generator=torch.Generator().manual_seed(0))  # ode_sample's noise
    theirs = plain(wan)(prompt=PROMPTS, latents=x0, num_inference_steps=4, guidance_scale=guidance,
                        output_type="latent", **CALL).frames
    assert theirs.shape == ours.shape and theirs.abs().max() > 0.1
    print(f"wan ODE vs WanPipeline (guidance {guidance}): max |diff| = {(ours - theirs).abs().max():.2e}")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_a_shipped_unipc_scheduler_is_stepped_with_euler_at_its_flow_shift(wan):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from treegrpo_ray.models.families.wan import euler_scheduler_for
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    euler = euler_scheduler_for(unipc)
    assert isinstance(euler, FlowMatchEulerDiscreteScheduler) and euler.config.shift == 5.0
    with pytest.raises(ValueError, match="not a flow scheduler"):
        euler_scheduler_for(UniPCMultistepScheduler())


def test_tree_rescoring_reproduces_log_probs_and_nfe(wan):
    policy = load(wan, guidance_scale=5.0)
    sampler = TreeSampler(policy, variant="tree", num_steps=6, k=2, depth=2, noise_level=0.7)
    batch = sampler.sample(PROMPTS, window_start=1, seed=0)
    assert batch.nfe == len(PROMPTS) * count_nfe(6, 2, 2, 1)                     # 2 x (1 + 3 + 4 x 3) = 32
    assert batch.children.shape[2:] == (4, 3, 4, 4) and batch.leaf_latents.shape == (8, 4, 3, 4, 4)
    s, s_next = batch.sigmas[batch.step_index], batch.sigmas[batch.step_index + 1]
    prompts = [batch.prompts[i] for i in batch.decision_prompt.tolist()]
    with torch.no_grad():
        out = policy.predict(batch.latents, s, prompts)
    again = policy.sde_step(batch.latents, out, s, s_next, sampler.noise_level, prev_sample=batch.children).log_prob
    assert batch.children.std() > 0.1 and torch.isfinite(again).all()
    print(f"wan re-scored log-probs: max |diff| = {(again - batch.old_log_probs).abs().max():.2e}")
    torch.testing.assert_close(again, batch.old_log_probs, rtol=0, atol=1e-5)


def test_the_wan_vae_decode_equals_the_pipelines_own(wan):
    from treegrpo_ray.rewards.decode import VideoLatentDecoder, load_decoder
    decoder = load_decoder(wan, video_batch_size=2)          # the pipeline's one call of 2 clips
    assert isinstance(decoder, VideoLatentDecoder)
    x0 = torch.randn((2, 4, 3, 4, 4), generator=torch.Generator().manual_seed(3))
    pipe = plain(wan)
    latents = pipe(prompt=PROMPTS, latents=x0, num_inference_steps=2, output_type="latent", **CALL).frames
    frames = pipe(prompt=PROMPTS, latents=x0, num_inference_steps=2, output_type="pt", **CALL).frames  # (B, T, 3, H, W)
    ours = decoder.decode(latents)
    assert ours.shape == frames.shape == (2, FRAMES, 3, SIDE, SIDE) and frames.std() > 0.01
    print(f"wan decode vs pipeline output_type='pt': max |diff| = {(ours - frames).abs().max():.2e}")
    torch.testing.assert_close(ours, frames, rtol=0, atol=1e-6)
    # in chunks of one clip (the reward actors' default): the same up to the kernels' batch-size rounding
    chunked = load_decoder(wan, video_batch_size=1).decode(latents)
    print(f"wan decode in 1-clip chunks vs pipeline: max |diff| = {(chunked - frames).abs().max():.2e}")
    torch.testing.assert_close(chunked, frames, rtol=0, atol=2e-5)


def test_video_rewards_average_frame_scores_and_evaluation_adds_temporal_consistency():
    from treegrpo_ray.rewards.reward_model import RewardModel
    from treegrpo_ray.rewards.video import frame_indices, temporal_consistency
    assert frame_indices(81).tolist() == [0, 27, 53, 80] and frame_indices(2).tolist() == [0, 1]

    class Brightness:
        name = "brightness"

        def __call__(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    class Decoder:
        def decode(self, latents):  # clip b, frame t is a flat grey of value (b + t) / 20
            b, t = latents.shape[0], 9
            return ((torch.arange(b)[:, None] + torch.arange(t)[None]) / 20).view(b, t, 1, 1, 1).expand(b, t, 3, 2, 2)

    model = RewardModel(Decoder(), {"brightness": Brightness()})
    scores = model.score_latents(torch.zeros(2, 4, 3, 1, 1), ["a", "b"], evaluation=True)
    # frames 0, 3, 5, 8 (linspace(0, 8, 4) rounded): clip 0 mean (0 + 3 + 5 + 8) / 4 / 20 = 0.2
    torch.testing.assert_close(scores["brightness"], torch.tensor([0.2, 0.25]))
    torch.testing.assert_close(scores["temporal_consistency"], torch.tensor([0.95, 0.95]))  # 1 - 1/20 per step
    assert "temporal_consistency" not in model.score_latents(torch.zeros(2, 4, 3, 1, 1), ["a", "b"])
    assert float(temporal_consistency(torch.rand(1, 1, 3, 2, 2))) == 1.0


def test_num_frames_is_validated_in_the_config():
    assert load_config("configs/smoke.yaml", ["model.num_frames=9"]).model.num_frames == 9
    with pytest.raises(ConfigError, match="model.num_frames"):
        load_config("configs/smoke.yaml", ["model.num_frames=8"])


def run(pipeline_dir, tmp_path, lora_rank, *extra):
    cfg = load_config("configs/smoke.yaml", [
        f"model.pretrained={pipeline_dir}", "model.max_sequence_length=8", f"model.resolution={SIDE}",
        f"model.num_frames={FRAMES}", "model.guidance_scale=5.0",
        "prompts=configs/prompts/example_prompts.txt", "rewards.terms.0.name=jpeg_compressibility",
        f"tracking.output_dir={tmp_path}", "tracking.run_name=r", "tracking.progress=false", "mode=local",
        "learner.lr=1e-2", f"model.lora_rank={lora_rank}", *extra])
    summary = driver.run(cfg)
    assert summary["iterations"] == 2 and len(summary["train_rewards"]) == 2
    return tmp_path / "r"


def clip(pipe):
    return pipe(prompt="a red circle", num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0), **CALL).frames


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_a_short_run_trains_and_exports_what_plain_diffusers_loads(wan, tmp_path, lora_rank):
    from diffusers import AutoModel
    extra = ["eval_every=2", "eval_prompts=2", "eval_images_per_prompt=1", "tracking.sample_grid_every=2"]
    run_dir = run(wan, tmp_path, lora_rank, *(extra if lora_rank else []))
    export = run_dir / "export"
    base, trained = plain(wan), plain(wan)
    if lora_rank:
        trained.load_lora_weights(export)
    else:  # not from_pretrained(wan, transformer=...): WanPipeline's transformer is optional (it may be
        # None for Wan2.2), so diffusers 0.42 treats the keyword as an optional kwarg and loads the saved one
        trained.transformer = AutoModel.from_pretrained(str(export), subfolder="transformer")
    before, after = clip(base), clip(trained)
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-4   # the update reached the export
    if lora_rank:  # the eval run: a frames grid PNG and GIF clips in the run folder, before and after
        samples = run_dir / "samples"
        grids = sorted(samples.glob("iter_*.png"))
        gifs = sorted(samples.glob("iter_*_clip*.gif"))
        assert [g.name for g in grids] == ["iter_000000.png", "iter_000002.png"] and len(gifs) == 4
        from PIL import Image
        with Image.open(gifs[0]) as im:
            assert im.n_frames == FRAMES and im.size == (SIDE, SIDE)
        with Image.open(grids[-1]) as im:   # 2 clips x 8 frames, 2 px padding
            assert im.size == (8 * (SIDE + 2), 2 * (SIDE + 2))
        logged = sorted(p.name for p in tmp_path.glob("mlartifacts/*/artifacts/samples/clips/*.gif"))
        assert logged == [g.name for g in gifs]                     # the same clips in the MLflow run


def test_bfloat16_sampling_and_rescoring_stay_within_the_ratio_bound(wan):
    # bf16 weights and denoiser, float32 clip latents / step math / log-probs; the learner's
    # micro-batches of 5 decisions, not the sampler's tree levels (as test_families does for images)
    policy = load(wan, dtype="bfloat16", lora_rank=4, guidance_scale=5.0)
    err = start_of_update_ratio_error(policy, 0.7)  # the same PROMPTS as test_families
    print(f"wan bf16 start-of-update |ratio - 1| max = {err:.2e}")
    assert err <= 1e-3
