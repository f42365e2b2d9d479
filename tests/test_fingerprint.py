"""Weights that prove they arrived: fingerprints by hand, a policy whose load binds nothing, a
sampler actor pulling from the real WeightStore, and a learner whose step changes nothing."""
import contextlib
from dataclasses import replace

import pytest
import torch

from treegrpo_ray.algo.sde import flow_sde_step

from treegrpo_ray.learning.learner import GRPOLearner, UpdateChangedNothing
from treegrpo_ray.models import DiffusionPolicy
from treegrpo_ray.models.fingerprint import WeightSyncError, differing, digest, fingerprint, positions

from test_learner import one_decision_batch

torch.set_num_threads(1)


def test_positions_and_samples_by_hand():
    assert positions(10, samples=4).tolist() == [0, 3, 6, 9]      # round(9 * i / 3)
    assert positions(3, samples=4).tolist() == [0, 1, 2]          # small tensors: every element
    t = torch.arange(1000.0).reshape(10, 100)
    fp = fingerprint({"t": t, "b": torch.tensor([1.5, -0.0], dtype=torch.bfloat16)})
    assert list(fp) == ["t", "b"]
    assert fp["t"].shape == (256,) and fp["t"][0] == 0 and fp["t"][-1] == 999
    assert fp["b"].tolist() == [1.5, -0.0] and fp["b"].dtype == torch.float32


def test_differing_is_exact_and_names_tensors():
    a = {"w": torch.zeros(8), "v": torch.full((3,), float("nan"))}
    fp = fingerprint(a)
    assert differing(fp, fingerprint({k: v.clone() for k, v in a.items()})) == []   # NaN == NaN bitwise
    b = {"w": torch.zeros(8), "v": a["v"].clone()}
    b["w"][7] = 1e-30                                                                 # one sampled element, tiny
    assert differing(fp, fingerprint(b)) == ["w"]
    assert differing(fp, fingerprint({"w": -b["w"] * 0})) == ["v", "w"]               # -0.0 != 0.0, v missing
    assert digest(fp) == digest(fingerprint(a)) != digest(fingerprint(b)) and len(digest(fp)) == 12


def load(path, **kw):
    return DiffusionPolicy.from_pretrained(path, max_sequence_length=8, **kw)


@pytest.mark.parametrize("lora_rank", [0, 2])
def test_policy_load_is_verified_and_a_broken_binding_stops(tiny_sd3_dir, lora_rank):
    learner_side, sampler_side = load(tiny_sd3_dir, lora_rank=lora_rank), load(tiny_sd3_dir, lora_rank=lora_rank)
    with torch.no_grad():
        for p in learner_side.trainable_parameters():
            p.add_(0.01)
    state = learner_side.state_for_broadcast()
    published = fingerprint(state)
    sampler_side.load_broadcast_state(state, published, version=3)           # binds: passes
    assert differing(published, sampler_side.fingerprint()) == []
    # Break the binding: the load writes into copies, the transformer keeps its old weights.
    fresh = load(tiny_sd3_dir, lora_rank=lora_rank)
    source = fresh._broadcast_source
    fresh._broadcast_source = lambda: {k: v.detach().clone() for k, v in source().items()}
    with pytest.raises(WeightSyncError, match=r"weights version 3 did not arrive in this policy's denoiser: "
                                              r"\d+ of \d+ tensors differ from what the learner published"):
        fresh.load_broadcast_state(state, published, version=3)
    # A state changed in transit (here: one tensor scaled) is caught the same way, and named.
    name = next(iter(state))
    with pytest.raises(WeightSyncError, match=rf"1 of {len(state)} tensors differ .*{name}"):
        load(tiny_sd3_dir, lora_rank=lora_rank).load_broadcast_state({**state, name: state[name] * 2}, published, 4)


@pytest.mark.ray
def test_sampler_actor_checks_what_it_pulls_from_the_store(tiny_sd3_dir, tmp_path, ray_local):
    """The actor code path (SamplerActor._pull) against the real WeightStore actor; the learner
    side publishes as train_loop's rank 0 does."""
    import ray

    from treegrpo_ray.actors.sampler_actor import SamplerActor
    from treegrpo_ray.actors.train_loop import _publish
    from treegrpo_ray.actors.weight_store import WeightStore
    from treegrpo_ray.config import load_config, to_dict

    cfg = load_config("configs/smoke.yaml", [f"model.pretrained={tiny_sd3_dir}", f"tracking.output_dir={tmp_path}",
                                             "rewards.terms.0.name=jpeg_compressibility"])
    name = f"fp-test-{tmp_path.name}"
    store = WeightStore.options(name=name).remote()
    try:
        learner_side = load(tiny_sd3_dir, lora_rank=cfg.model.lora_rank, lora_alpha=cfg.model.lora_alpha)
        with torch.no_grad():
            for p in learner_side.trainable_parameters():
                p.add_(0.01)
        _publish(store, 1, learner_side, 0)
        sampler = SamplerActor(to_dict(cfg), name)
        info, *_ = sampler.sample(["a red circle"], window_start=0, seed=0)
        assert sampler.version == 1 and info.policy_version == 1 and info.call.weights_verified
        assert differing(fingerprint(learner_side.live_state()), sampler.policy.fingerprint()) == []
        # version 2, and this sampler's load now writes into copies of its tensors
        with torch.no_grad():
            for p in learner_side.trainable_parameters():
                p.add_(0.01)
        v1 = ray.get(store.latest.remote(-1))  # what Pools.launch hands out while version 1 is the newest
        _publish(store, 2, learner_side, 0)
        sampler.sample(["a red circle"], window_start=0, seed=0, weights=v1)  # not newer: nothing loaded
        assert sampler.version == 1 and differing(fingerprint(learner_side.live_state()),
                                                  sampler.policy.fingerprint()) != []
        source = sampler.policy._broadcast_source
        sampler.policy._broadcast_source = lambda: {k: v.detach().clone() for k, v in source().items()}
        # the weights as the driver hands them out with the work (Pools.launch), and as pulled
        for weights in (ray.get(store.latest.remote(-1)), None):
            with pytest.raises(WeightSyncError, match="weights version 2 did not arrive"):
                sampler.sample(["a red circle"], window_start=0, seed=0, weights=weights)
            assert sampler.version == 1  # not recorded as loaded
    finally:
        ray.kill(store)


class ScalarPolicy(torch.nn.Module):
    """velocity = w everywhere (w the only weight), in a chosen dtype."""

    def __init__(self, w=1.0, dtype=torch.float32):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w, dtype=dtype))
        self.optimised = [self.w]

    def predict(self, latents, sigmas, prompts, module=None, uncond_grad=True):  # no CFG: uncond_grad moot
        return self.w * torch.ones_like(latents)

    def sde_step(self, x, out, s, s_next, noise_level, **kw):
        return flow_sde_step(x, out, s, s_next, noise_level, **kw)

    def trainable_parameters(self):
        return self.optimised

    def live_state(self):
        return {"w": self.w}

    @contextlib.contextmanager
    def reference(self):
        yield


def two_leaf_batch(policy):
    return one_decision_batch(policy, k=2)


def test_an_update_below_the_dtypes_resolution_stops():
    # float32 has 24 significant bits: at w = 1 the next value is 1 + 2^-23 ~ 1.2e-7, and an Adam step is ~lr = 1e-9
    policy = ScalarPolicy(1.0)
    learner = GRPOLearner(policy, lr=1e-9, noise_level=0.7, grad_clip=0.0)
    with pytest.raises(UpdateChangedNothing, match=r"update 1 took 1 optimizer steps .* no weight of the policy's "
                                                   r"denoiser changed.*learner.lr=1e-09 .*\(float32\)"):
        learner.update(two_leaf_batch(policy), torch.tensor([1.0, -1.0]))
    fp32 = ScalarPolicy(1.0)
    metrics = GRPOLearner(fp32, lr=1e-5, noise_level=0.7, grad_clip=0.0).update(two_leaf_batch(fp32),
                                                                               torch.tensor([1.0, -1.0]))
    assert fp32.w.item() != 1.0 and metrics["weights/fingerprint"] == int(digest(fingerprint({"w": fp32.w})), 16)


def test_bf16_weights_train_through_float32_masters():
    """bf16 has 8 significant bits: at w = 1 the next value is 1 + 2^-7 = 1.0078. Adam steps of ~1e-3
    round away one by one in bf16; the learner's float32 master accumulates them, and after enough
    steps the bf16 weight moves by one bf16 ulp, where the float32 run has moved by as much."""
    policy = ScalarPolicy(1.0, torch.bfloat16)
    learner = GRPOLearner(policy, lr=1e-3, noise_level=0.7, grad_clip=0.0)
    batch = two_leaf_batch(policy)
    learner.update(batch, torch.tensor([1.0, -1.0]))     # a step below bf16's resolution is not an error now
    assert policy.w.item() == 1.0 and learner.precision.masters[0].item() != 1.0
    for i in range(1, 12):
        learner.update(replace(batch, policy_version=i), torch.tensor([1.0, -1.0]), iteration=i)  # lag 0
    master = learner.precision.masters[0].item()
    assert abs(master - 1.0) > 2 ** -8                    # past half a bf16 ulp: the bf16 weight must have moved
    assert policy.w.item() == torch.tensor(master).to(torch.bfloat16).item() != 1.0
    # the state round-trips: a fresh learner over the same weights resumes from the same master
    twin = GRPOLearner(ScalarPolicy(policy.w.item(), torch.bfloat16), lr=1e-3, noise_level=0.7, grad_clip=0.0)
    twin.load_state(learner.state())
    assert twin.precision.masters[0].item() == master


def test_zero_advantages_are_not_an_error():
    policy = ScalarPolicy(1.0, torch.bfloat16)  # no gradient at all: nothing to change, nothing wrong
    GRPOLearner(policy, lr=1e-5, noise_level=0.7).update(two_leaf_batch(policy), torch.zeros(2))
    assert policy.w.item() == 1.0


def test_an_optimizer_holding_tensors_the_model_does_not_run_stops():
    policy = ScalarPolicy(1.0)
    ghost = torch.nn.Parameter(torch.tensor(1.0))
    policy.optimised = [ghost]  # what a wrapper that re-creates parameters would leave the optimizer with
    ghost.grad = None
    learner = GRPOLearner(policy, lr=0.05, noise_level=0.7)
    with pytest.raises(UpdateChangedNothing, match="no gradient reached"):
        learner.update(two_leaf_batch(policy), torch.tensor([1.0, -1.0]))


def test_a_fingerprint_pickles_to_its_samples_alone():
    # it travels with every publish and every sampler call: each tensor must own its samples (a
    # view of the concatenated samples pickled the whole concatenation for every tensor: 25 MB
    # for the miniature's 8 MB of weights)
    import pickle

    from treegrpo_ray.models.fingerprint import SAMPLES
    state = {f"w{i}": torch.randn(1000) for i in range(20)}
    size = len(pickle.dumps(fingerprint(state), protocol=5))
    assert size < 20 * SAMPLES * 4 * 1.5, size
