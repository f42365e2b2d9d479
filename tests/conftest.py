"""Shared pytest fixtures. Nothing here downloads: HF_HUB_OFFLINE is forced on before any
huggingface_hub import (it reads the variable once, at import time)."""
import os
import time

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402


# Each tier's modules, longest first (measured 2026-12-07, scripts/suite_report.sh): scripts/test.sh
# runs pytest-xdist with --dist loadfile --no-loadscope-reorder, which hands modules to the workers in
# this order (its own reorder sorts them by test count, which queued a long module last). Longest
# first is the classic makespan heuristic, with one twist for the integration tier: xdist gives a
# worker its next module as soon as it has <= 2 tests pending, so the worker that starts the
# one-test learning module (~24 min) claims the module after it at once and runs it only when the
# learning test is done. That module is the short family CLI one (~1 min); before, it was the
# `ray job submit` module (~6 min), which then ran last on its own.
LONGEST_FIRST = ("test_cluster.py", "test_learning.py", "test_family_cli.py",  # integration tier's first three
                 "test_deploy_emulation.py",
                 "test_system.py", "test_outputs.py", "test_evaluate.py", "test_gpu_check.py", "test_plan.py",
                 "test_preemption.py", "test_faults.py", "test_security.py", "test_cli.py", "test_tracking.py",
                 "test_fsdp.py", "test_miniature_assets.py", "test_ddp_accumulation.py", "test_families.py",
                 "test_guards.py", "test_layering.py", "test_local_ray.py", "test_fingerprint.py", "test_dispatch.py",
                 "test_packaging.py", "test_family_sd35.py", "test_family_qwenimage.py", "test_family_wan.py",
                 "test_tree_sampler.py",
                 "test_batch_arithmetic.py")


def pytest_collection_modifyitems(config, items):
    """Longest modules first (see LONGEST_FIRST). `gpu` tests need CUDA: skipped (and so reported,
    never counted as passed) without it."""
    import torch

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a module stays
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (scripts/gpu_check.sh runs these on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


_STARTED: dict[str, float] = {}


def pytest_runtest_logstart(nodeid, location):
    _STARTED[nodeid] = time.time()


def pytest_runtest_logfinish(nodeid, location):
    """With TREEGRPO_TEST_TIMELINE=FILE (scripts/suite_report.sh sets it), each test's start, end and
    xdist worker go to FILE: which tests ran beside which, for the report's timeline."""
    path = os.environ.get("TREEGRPO_TEST_TIMELINE")
    if path and nodeid in _STARTED:
        with open(path, "a") as f:
            f.write(f"{_STARTED.pop(nodeid):.1f}\t{time.time():.1f}\t{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"
                    f"\t{nodeid}\n")


@pytest.fixture(scope="session")
def tiny_sd3_dir(tmp_path_factory):
    """A random-init tiny StableDiffusion3Pipeline written with `save_pretrained` (no T5);
    returns the pipeline dir, for loading through the production `from_pretrained` path."""
    import torch

    from tools.tiny_pipelines import save_tiny_sd3

    with torch.random.fork_rng(devices=[]):
        return save_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"), seed=0)


@pytest.fixture(scope="session")
def ray_local():
    """One loopback-only Ray instance shared by every Ray test (fixed CPU count so scheduling is
    the same on any machine). `address="local"` never attaches to a stray cluster."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1",
                 _node_ip_address="127.0.0.1", log_to_driver=False,
                 runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}})
    yield ray
    ray.shutdown()


# SD1.5's scheduler as the hub ships it (PNDM, its scheduler_config.json's fields); the policy swaps in DDIM
SD15_HUB_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
                      "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
                      "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}


@pytest.fixture(scope="session")
def tiny_family_pipelines(tmp_path_factory):
    """Tiny random-init pipelines of each family's real structure, saved with `save_pretrained`:
    sd35 (SD3.5-medium's layers), flux (FLUX.1-dev), flux_schnell, sd15 (with the hub's PNDM config),
    qwenimage (Qwen-Image), wan (Wan2.1 T2V, with a FlowMatchEuler scheduler)."""
    import json

    import torch

    from tools.tiny_pipelines import save_tiny, save_tiny_sd3

    with torch.random.fork_rng(devices=[]):
        dirs = {"sd35": save_tiny_sd3(tmp_path_factory.mktemp("sd35"), sd35=True),
                "flux": save_tiny("flux", tmp_path_factory.mktemp("flux")),
                "flux_schnell": save_tiny("flux", tmp_path_factory.mktemp("schnell"), guidance_embeds=False),
                "sd15": save_tiny("sd15", tmp_path_factory.mktemp("sd15")),
                "qwenimage": save_tiny("qwenimage", tmp_path_factory.mktemp("qwenimage")),
                "wan": save_tiny("wan", tmp_path_factory.mktemp("wan"))}
    index = json.loads((dirs["sd15"] / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (dirs["sd15"] / "model_index.json").write_text(json.dumps(index))
    (dirs["sd15"] / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_HUB_SCHEDULER))
    return dirs
