"""DiffusionPolicy on a tiny SD3 pipeline saved by the test session (real from_pretrained path,
HF_HUB_OFFLINE=1): loading, CFG batching, prompt cache, sigmas, broadcast state, export, reference."""
import math

import pytest
import torch

from treegrpo_ray.models import DiffusionPolicy

torch.set_num_threads(1)
PROMPTS = ["a red circle", "a blue square", "a red circle"]


def load(path, **kw):
    return DiffusionPolicy.from_pretrained(path, max_sequence_length=8, **kw)


def perturb(params, seed, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=gen).to(p.dtype))


def inputs(policy, b=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((b, *policy.latent_shape), generator=gen), torch.tensor([1.0, 0.6, 0.1])[:b]


@pytest.fixture(scope="module")
def policy(tiny_sd3_dir):
    return load(tiny_sd3_dir)


def test_loads_offline_without_vae_and_freezes_text_encoders(policy):
    import huggingface_hub.constants

    assert huggingface_hub.constants.HF_HUB_OFFLINE  # nothing in this file can reach the hub
    pipe = policy.pipeline
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert pipe.vae is None and pipe.text_encoder_3 is None  # VAE never loaded; T5 saved as null
    assert policy.vae_scale_factor == 2  # 2 ** (len(block_out_channels=(8, 16)) - 1)
    assert policy.resolution == 16 and policy.latent_shape == (4, 8, 8)  # sample_size 8 * 2 pixels
    for enc in (pipe.text_encoder, pipe.text_encoder_2):
        assert not any(p.requires_grad for p in enc.parameters())
    assert len(policy.trainable_parameters()) == len(list(policy.denoiser.parameters()))  # full fine-tune


def test_resolution_sets_latent_shape_and_is_checked(tiny_sd3_dir):
    assert load(tiny_sd3_dir, resolution=8).latent_shape == (4, 4, 4)  # 8 px / vae factor 2
    with pytest.raises(ValueError, match="multiple"):
        load(tiny_sd3_dir, resolution=10)  # not a multiple of vae 2 * patch 2 = 4


def test_velocity_is_cfg_of_two_separate_forwards_in_one_call(policy):
    x, sig = inputs(policy)
    pipe, g = policy.pipeline, 4.5
    # independent reference: the pipeline's own encode_prompt with its CFG branch, two forwards
    pe, ne, pp, npool = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                           negative_prompt="", max_sequence_length=8)
    t = sig * 1000  # timestep = sigma * num_train_timesteps, as StableDiffusion3Pipeline passes it
    calls = []
    hook = policy.denoiser.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["hidden_states"].shape[0]),
                                                        with_kwargs=True)
    try:
        with torch.no_grad():
            v = policy.predict(x, sig, PROMPTS)
            assert calls == [6]  # ONE call with 2B = 6 rows
            cond = policy.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=pe, pooled_projections=pp,
                                      return_dict=False)[0]
            uncond = policy.denoiser(hidden_states=x, timestep=t, encoder_hidden_states=ne,
                                        pooled_projections=npool, return_dict=False)[0]
            v1 = policy.predict(x, sig, PROMPTS, cfg_scale=1.0)
    finally:
        hook.remove()
    assert calls[-1] == 3  # guidance <= 1 runs the cond half only
    assert v.dtype == torch.float32 and v.shape == (3, 4, 8, 8)
    torch.testing.assert_close(v, uncond + g * (cond - uncond), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, cond, atol=1e-6, rtol=1e-6)
    assert (v - v1).abs().max() > 1e-3  # guidance changes the output: the test can fail


def test_prompt_encoding_is_cached(tiny_sd3_dir):
    policy = load(tiny_sd3_dir)
    seen = []
    original = policy.pipeline.encode_prompt
    policy.pipeline.encode_prompt = lambda prompt, *a, **kw: (seen.append(list(prompt)), original(prompt, *a, **kw))[1]
    x, sig = inputs(policy)
    with torch.no_grad():
        policy.predict(x, sig, PROMPTS)
        policy.predict(x, sig, PROMPTS[::-1])
    # first call: each distinct prompt on its own, then the negative "" once; never again
    assert seen == [["a red circle"], ["a blue square"], [""]]
    assert len(policy.prompts) == 3


def test_prompt_embeddings_do_not_depend_on_which_prompts_were_missing_together(tiny_sd3_dir):
    # A restarted actor meets its prompts in a different order and grouping than its first life
    # (issue 17); its embeddings must be the same bits.
    first, restarted = load(tiny_sd3_dir), load(tiny_sd3_dir)
    many = ["a red circle", "a blue square", "a green triangle", "two cats", "a red circle"]
    e1, p1 = first.prompts.encode(many)
    restarted.prompts.encode(["two cats"])
    restarted.prompts.encode(["a green triangle", "a blue square"])
    e2, p2 = restarted.prompts.encode(many)
    assert torch.equal(e1, e2) and torch.equal(p1, p2)


def test_sigmas_match_the_scheduler_hand_computed(policy):
    s = policy.sigmas(10)
    assert s.dtype == torch.float32 and s.shape == (11,)
    # FlowMatchEuler, shift 3: base sigma_min = 3*0.001/(1+2*0.001) = 0.0029940; set_timesteps takes
    # u = linspace(1, 0.0029940, 10) and shifts again: sigma = 3u / (1 + 2u)
    # u1 = 1 - 0.997006/9 = 0.889222 -> 2.667666/2.778444 = 0.960130;  u9 = 0.002994 -> 0.008929
    assert s[0] == 1.0 and s[-1] == 0.0
    assert math.isclose(float(s[1]), 0.960130, abs_tol=2e-6)
    assert math.isclose(float(s[9]), 0.008929, abs_tol=2e-6)


def test_sigmas_use_dynamic_shift_mu(tmp_path):
    from tools.tiny_pipelines import build_tiny_sd3

    pipe = build_tiny_sd3(tmp_path, dynamic_shift=True)
    policy = DiffusionPolicy(pipe, source=str(tmp_path), vae_scale_factor=2, device=torch.device("cpu"),
                             dtype=torch.float32, lora_rank=0, lora_alpha=None, lora_targets=(), guidance_scale=4.5,
                             max_sequence_length=8, resolution=None)
    # 8x8 latents, patch 2 -> 16 tokens; calculate_shift with seq lens (4, 64) from the helper and the
    # scheduler's default shifts (0.5, 1.15): m = 0.65/60 = 0.0108333, b = 0.5 - 4m = 0.4566667,
    # mu = 16m + b = 0.63; sigma = e^mu / (e^mu + 1/u - 1), u = linspace(1, 0.001, 10) (no static shift)
    # u1 = 1 - 0.999/9 = 0.889 -> 1.877611 / (1.877611 + 0.124859) = 0.937647
    s = policy.sigmas(10)
    assert math.isclose(float(s[1]), 0.937647, abs_tol=1e-5)
    assert s[0] == 1.0 and s[-1] == 0.0


def test_lora_broadcast_round_trip_gives_identical_velocities(tiny_sd3_dir):
    a = load(tiny_sd3_dir, lora_rank=4, lora_alpha=8)
    perturb(a.trainable_parameters(), seed=1)
    state = a.state_for_broadcast()
    assert state and all("lora_" in k for k in state)  # adapters only, not the 22k base weights
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.values())
    b = load(tiny_sd3_dir, lora_rank=4, lora_alpha=8, seed=5)
    x, sig = inputs(a)
    with torch.no_grad():
        va, vb_before = a.predict(x, sig, PROMPTS), b.predict(x, sig, PROMPTS)
        b.load_broadcast_state(state)
        vb = b.predict(x, sig, PROMPTS)
    assert (va - vb_before).abs().max() > 1e-3
    assert torch.equal(va, vb)
    perturb(a.trainable_parameters(), seed=2)  # the broadcast dict is a copy, not a view
    assert all(torch.equal(state[k], v) for k, v in b.state_for_broadcast().items())


def test_load_broadcast_state_is_strict(tiny_sd3_dir):
    lora = load(tiny_sd3_dir, lora_rank=2)
    state = lora.state_for_broadcast()
    key = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        lora.load_broadcast_state({k: v for k, v in state.items() if k != key})
    with pytest.raises(ValueError, match="unexpected"):
        lora.load_broadcast_state({**state, "extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shapes"):
        lora.load_broadcast_state({**state, key: torch.zeros(3, 3)})
    full = load(tiny_sd3_dir)
    with pytest.raises(ValueError, match="keys differ"):
        full.load_broadcast_state(state)


def test_full_broadcast_round_trip(tiny_sd3_dir, policy):
    a = load(tiny_sd3_dir)
    perturb(a.trainable_parameters(), seed=3)
    state = a.state_for_broadcast()
    assert set(state) == set(a.denoiser.state_dict())
    x, sig = inputs(a)
    with torch.no_grad():
        policy_copy = load(tiny_sd3_dir)
        policy_copy.load_broadcast_state(state)
        assert torch.equal(a.predict(x, sig, PROMPTS), policy_copy.predict(x, sig, PROMPTS))


def test_lora_export_loads_with_plain_diffusers(tiny_sd3_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    a = load(tiny_sd3_dir, lora_rank=4, lora_alpha=8)  # alpha != rank: scale 2 must survive export
    perturb(a.trainable_parameters(), seed=4)
    out = a.export(tmp_path / "lora")
    assert (out / "pytorch_lora_weights.safetensors").exists()
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(out)
    x, sig = inputs(a)
    emb, pooled = a.prompts.encode(PROMPTS)
    kw = dict(hidden_states=x, timestep=sig * 1000, encoder_hidden_states=emb, pooled_projections=pooled,
              return_dict=False)
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**kw)[0], a.denoiser(**kw)[0], atol=1e-5, rtol=1e-5)


def test_full_export_loads_with_save_pretrained_format(tiny_sd3_dir, tmp_path):
    from diffusers import SD3Transformer2DModel

    a = load(tiny_sd3_dir)
    perturb(a.trainable_parameters(), seed=6)
    a.export(tmp_path / "full")
    t = SD3Transformer2DModel.from_pretrained(tmp_path / "full", subfolder="transformer")
    x, sig = inputs(a)
    with torch.no_grad():
        assert torch.equal(a.predict(x, sig, PROMPTS), a.predict(x, sig, PROMPTS, module=t))


def test_reference_is_the_base_model(tiny_sd3_dir, policy):
    x, sig = inputs(policy)
    with torch.no_grad():
        base = policy.predict(x, sig, PROMPTS)
        for kw in (dict(lora_rank=4), dict()):
            p = load(tiny_sd3_dir, **kw)
            perturb(p.trainable_parameters(), seed=7)
            assert (p.predict(x, sig, PROMPTS) - base).abs().max() > 1e-3
            with p.reference():
                torch.testing.assert_close(p.predict(x, sig, PROMPTS), base, atol=1e-6, rtol=1e-6)
            assert (p.predict(x, sig, PROMPTS) - base).abs().max() > 1e-3  # restored on exit


def test_uncond_grad_off_leaves_only_the_conditional_gradient(tiny_sd3_dir):
    # v = u + g (c - u) = (1 - g) u + g c, so for L = <v, w>:
    #   both halves:  dL = (1 - g) d<u, w> + g d<c, w>;   uncond detached: dL = g d<c, w>
    p, g = load(tiny_sd3_dir), 4.5
    x, sig = inputs(p)
    w = torch.randn((3, *p.latent_shape), generator=torch.Generator().manual_seed(1))
    params = p.trainable_parameters()

    def grad(fn):
        p.denoiser.zero_grad(set_to_none=True)
        (fn() * w).sum().backward()
        return torch.cat([q.grad.flatten() for q in params])

    both = grad(lambda: p.predict(x, sig, PROMPTS))
    cond_only = grad(lambda: p.predict(x, sig, PROMPTS, uncond_grad=False))
    c = grad(lambda: p.predict(x, sig, PROMPTS, cfg_scale=1.0))
    u = grad(lambda: p.predict(x, sig, [p.negative_prompt] * 3, cfg_scale=1.0))
    torch.testing.assert_close(cond_only, g * c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both, (1 - g) * u + g * c, atol=1e-5, rtol=1e-4)
    assert (both - cond_only).norm() > 0.1 * both.norm()  # the two options differ: the test can fail
    with torch.no_grad():  # values are the same either way: re-scoring stays exact
        torch.testing.assert_close(p.predict(x, sig, PROMPTS, uncond_grad=False), p.predict(x, sig, PROMPTS))


def test_gradients_reach_only_trainable_tensors(tiny_sd3_dir):
    p = load(tiny_sd3_dir, lora_rank=2)
    x, sig = inputs(p)
    p.predict(x, sig, PROMPTS).square().mean().backward()
    lora_b = [prm for n, prm in p.denoiser.named_parameters() if "lora_B" in n]
    assert all(prm.grad is not None for prm in lora_b) and any(prm.grad.abs().sum() > 0 for prm in lora_b)
    assert all(prm.grad is None for n, prm in p.denoiser.named_parameters() if "lora_" not in n)
    assert all(prm.grad is None for prm in p.pipeline.text_encoder.parameters())


def test_kinds_and_unsupported_pipelines_are_named(tiny_sd3_dir, tmp_path):
    assert load(tiny_sd3_dir, kind="flow").family.kind == "flow"
    with pytest.raises(ValueError, match="model.kind='ddim' but .* is a StableDiffusion3Pipeline \\(flow\\)"):
        load(tiny_sd3_dir, kind="ddim")
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    with pytest.raises(NotImplementedError, match="StableDiffusionXLPipeline is not a supported pipeline; supported: "
                                                  "StableDiffusion3Pipeline, FluxPipeline, StableDiffusionPipeline"):
        load(tmp_path)
    with pytest.raises(ValueError, match="kind"):
        load(tiny_sd3_dir, kind="vpred")
    with pytest.raises(ValueError, match="dtype"):
        load(tiny_sd3_dir, dtype="float64")


def test_bfloat16_weights_float32_velocity_and_adapters(tiny_sd3_dir):
    p = load(tiny_sd3_dir, dtype="bfloat16", lora_rank=2, device="auto")
    assert p.device == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    assert p.denoiser.pos_embed.proj.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 for t in p.trainable_parameters())  # adapters stay float32
    x, sig = inputs(p)
    with torch.no_grad():
        v = p.predict(x, sig, PROMPTS)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
