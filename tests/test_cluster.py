"""A real multi-node Ray cluster on loopback (treegrpo_ray.loopback): a head and one raylet per pool
group carrying the slot resources deploy/ gives it, token auth on as KubeRay sets it. The CLI joins
it through ray_address, as a user's driver on the head would.

- A run with its sampler, reward and learner pools on three different nodes trains exactly the
  weights and metrics of the same run in one process (which the single-node Ray run equals bit for
  bit: tests/test_system.py, tests/test_faults.py).
- A node lost mid-run, per node kind: its raylet and everything on it SIGKILLed after an iteration
  the test picks, a replacement node with the same resources joining 5 s later. The run finishes
  with every iteration logged once, no tree dropped and the same final weights bit for bit.

Each node is a process group the test started, ended by pid (never `ray stop`)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
import torch

from treegrpo_ray.checkpoint import latest_checkpoint, load_checkpoint
from treegrpo_ray.config import load_config
from treegrpo_ray.driver import run
from treegrpo_ray.loopback import LoopbackCluster, NodeSpec

ROOT = Path(__file__).resolve().parent.parent
ITERATIONS = 5
PINNED = ["pools.sampler.resources.sampler_slot=1", "pools.reward.resources.reward_slot=1",
          "learner.resources.resources.learner_slot=1"]
COMPARED = ("reward/combined", "learner/grad_norm", "adv/abs_mean", "tree/leaves", "weights/version")

pytestmark = [pytest.mark.ray, pytest.mark.integration]


@pytest.fixture(scope="module")
def loopback():
    """Head + sampler, reward and learner nodes sized for the GPU configs' pools (4 samplers, 2 reward
    actors, 2 learner workers; one logical CPU each), as `loopback.nodes_for` sizes them."""
    nodes = [NodeSpec("sampler", 4, {"sampler_slot": 4.0}), NodeSpec("reward", 2, {"reward_slot": 2.0}),
             NodeSpec("learner", 2, {"learner_slot": 2.0})]
    with LoopbackCluster(nodes, private_home=True) as cluster:
        yield cluster


def overrides(tiny_sd3_dir, out, *extra) -> list[str]:
    return [f"model.pretrained={tiny_sd3_dir}", "prompts=configs/prompts/example_prompts.txt",
            "rewards.terms.0.name=jpeg_compressibility", f"tracking.output_dir={out}", "tracking.run_name=r",
            f"iterations={ITERATIONS}", "checkpoint.every=2", "checkpoint.keep=5", *extra]


def metrics(db: str, keys=COMPARED) -> tuple[dict[str, list[tuple[int, float]]], str]:
    client = mlflow.MlflowClient(db)
    (r,) = client.search_runs([client.get_experiment_by_name("treegrpo").experiment_id])
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)) for k in keys}, \
        r.info.status


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(out / "r" / "checkpoints"))[0]


@pytest.fixture(scope="module")
def in_process(tiny_sd3_dir, tmp_path_factory):
    """The same run in one process on one thread (the actors' thread count)."""
    out = tmp_path_factory.mktemp("in_process")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "")
        torch.set_num_threads(1)
        try:
            run(load_config("configs/smoke.yaml", overrides(tiny_sd3_dir, out, "mode=local", "tracking.progress=false")))
        finally:
            torch.set_num_threads(threads)
    return metrics(f"sqlite:///{out / 'mlflow.db'}")[0], final_weights(out)


def cli_on(cluster: LoopbackCluster, tiny_sd3_dir, out: Path, on_line=None, timeout: float = 900, argv=None):
    """The real CLI, joined to the cluster; `on_line(line)` sees each line of its output as it comes."""
    cmd = [sys.executable, "-m", "treegrpo_ray.run",
           *(argv or ["--config", "configs/smoke.yaml", *overrides(tiny_sd3_dir, out, *PINNED)]),
           f"ray_address={cluster.address}"]
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "MLFLOW_TRACKING_URI": "", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, deadline = [], time.monotonic() + timeout
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if on_line:
                on_line(line)
        proc.wait()
    finally:
        timer.cancel()
    assert time.monotonic() < deadline, "the run hung:\n" + "".join(lines)[-5000:]
    return proc.returncode, "".join(lines)


def assert_same_run(out: Path, in_process, log: str):
    want, weights = in_process
    got, status = metrics(f"sqlite:///{out / 'mlflow.db'}")
    assert status == "FINISHED", log[-4000:]
    for key in COMPARED:  # every iteration logged exactly once, with the same value
        assert got[key] == want[key], (key, got[key], want[key], log[-4000:])
    final = final_weights(out)
    assert final.keys() == weights.keys()
    assert max(float((final[k] - weights[k]).abs().max()) for k in final) == 0.0


def test_pools_on_three_nodes_train_the_same_bits_as_one_process(loopback, tiny_sd3_dir, tmp_path, in_process):
    code, log = cli_on(loopback, tiny_sd3_dir, tmp_path / "out")
    assert code == 0, log[-5000:]
    placed = re.search(r"placement: sampler on node (\w+) \| reward on node (\w+) \| weight store on node (\w+) \| "
                       r"learner on node (\w+) \| driver on node (\w+)", log)
    assert placed, log[-3000:]
    sampler, reward, store, learner, driver = placed.groups()
    assert len({sampler, reward, learner, driver}) == 4 and store == driver  # control actors on the driver's node
    assert_same_run(tmp_path / "out", in_process, log)


@pytest.mark.parametrize("node", ["sampler", "reward", "learner"])
def test_a_lost_node_costs_no_iteration(node, loopback, tiny_sd3_dir, tmp_path, in_process):
    # After iteration 2's line (iteration 3's sampling already in flight), SIGKILL the node: its
    # raylet, agents and actors or Ray Train worker. 5 s later a node with the same resources joins.
    state = {"killed": None, "joined": None}

    def replace_node():
        time.sleep(5)
        loopback.add(node)
        state["joined"] = time.monotonic()

    def on_line(line):
        if state["killed"] is None and re.match(r"iter\s+2/", line):
            loopback.kill(node)
            state["killed"] = time.monotonic()
            threading.Thread(target=replace_node, daemon=True).start()

    code, log = cli_on(loopback, tiny_sd3_dir, tmp_path / "out", on_line)
    assert state["killed"] is not None and code == 0, log[-6000:]
    while state["joined"] is None:  # the fixture's next test needs the node back
        time.sleep(1)
    assert_same_run(tmp_path / "out", in_process, log)
    got, _ = metrics(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}",
                     ("faults/retried_calls", "perf/actor_restarts", "perf/learner_restarts"))
    if node == "learner":
        assert sum(v for _, v in got["perf/learner_restarts"]) >= 1, log[-4000:]
        assert "Ray Train restored the learner group" in log
    else:
        assert sum(v for _, v in got["faults/retried_calls"]) >= 1, log[-4000:]
        assert sum(v for _, v in got["perf/actor_restarts"]) >= 1, log[-4000:]
        assert re.search(r"lost \((ActorUnavailableError|ActorDiedError|RayActorError|ObjectLostError)\)", log)
    print(f"\n--- {node} node lost: the run's log ---\n{log}")


# ----------------------------------------------------------------------------- the GPU configs, rehearsed

# What a CPU cannot do, swapped; everything else as the config has it (pools, slots, learner workers,
# minibatches, micro_batch, LoRA, gradient checkpointing, sampler_calls, bf16).
CPU_SWAPS = ["model.device=cpu", "model.resolution=32", "pools.sampler.num_gpus=0", "pools.reward.num_gpus=0",
             "learner.resources.num_gpus=0", "pools.sampler.num_cpus=1", "pools.reward.num_cpus=1",
             "learner.resources.num_cpus=1", "iterations=2", "prompts=configs/prompts/example_prompts.txt",
             "tracking.run_name=r", "tracking.sample_grid_every=0"]
REWARD_SWAP = {  # reward models that need a download -> weight-free rewards, one term per term
    1: "rewards.terms=[{name: jpeg_compressibility}]",
    2: "rewards.terms=[{name: jpeg_compressibility, weight: 0.7}, {name: jpeg_incompressibility, weight: 0.3}]"}
GPU_CONFIGS = {  # config -> (tiny pipeline, reward terms, further swaps with the reason)
    "sd35m_hps": ("sd35", 1, []),
    "sd35m_hps_clip": ("sd35", 2, []),
    "flux1dev_hps": ("flux", 1, []),
    # fp16 -> float32: a CPU's fp16 kernels are impractically slow; 50 DDIM steps -> 10 (the layout,
    # 16 x 27 leaves and the learner's batch arithmetic unchanged: 50 steps took > 7 min an iteration)
    "sd15_hps": ("sd15", 1, ["model.dtype=float32", "tree.num_steps=10"]),
}


@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_gpu_config_runs_as_written_on_the_cluster(name, loopback, tiny_family_pipelines, tmp_path):
    family, terms, extra = GPU_CONFIGS[name]
    cfg = load_config(name, [])
    out = tmp_path / "out"
    argv = ["--config", name, f"model.pretrained={tiny_family_pipelines[family]}", REWARD_SWAP[terms],
            f"tracking.output_dir={out}", *CPU_SWAPS, *extra]
    code, log = cli_on(loopback, None, out, argv=argv, timeout=1200)
    assert code == 0, log[-6000:]
    got, status = metrics(f"sqlite:///{out / 'mlflow.db'}",
                          ("learner/decisions", "loss/clip_frac_first", "loss/clip_frac_later", "tree/leaves"))
    assert status == "FINISHED" and [s for s, _ in got["tree/leaves"]] == [1, 2]
    decisions = cfg.prompts_per_iteration * sum(cfg.tree.k ** d for d in range(cfg.tree.depth))
    assert [v for _, v in got["learner/decisions"]] == [decisions] * 2  # the config's batch arithmetic
    assert len(got["loss/clip_frac_first"]) == 2 and len(got["loss/clip_frac_later"]) == 2  # minibatches > 1
    placed = re.search(r"placement: sampler on node (\w+) \| reward on node (\w+) \| weight store on node \w+ \| "
                       r"learner on node (\w+) \| driver on node (\w+)", log)
    assert placed and len(set(placed.groups())) == 4, log[-3000:]
    assert (out / "r" / "export").is_dir()
    print(f"\n--- {name}: the run's log ---\n{log[-2500:]}")
