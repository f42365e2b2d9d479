"""A real multi-node Ray cluster on loopback (treegrpo_ray.loopback): a head and one raylet per pool
group carrying the slot resources deploy/ gives it, token auth on as KubeRay sets it. The CLI joins
it through ray_address, as a user's driver on the head would.

- A run with its sampler, reward and learner pools on three different nodes loses a node of each
  kind in turn (sampler, reward, learner): its raylet and everything on it SIGKILLed after an
  iteration the test picks, a replacement node with the same resources joining 5 s later. It
  finishes with every iteration logged once, no tree dropped, and exactly the weights and metrics of
  the same run in one process (which the single-node Ray run equals bit for bit:
  tests/test_system.py, tests/test_faults.py). One run checks both: without the losses it would
  train the same bits, so a separate loss-free run (80 s under the tier's load) checked nothing more.
- Two shipped GPU configs through the CLI with only what a CPU cannot do swapped: its pools, slots,
  learner workers, minibatches, micro_batch, LoRA, bf16 and sampler_calls as written.

Each node is a process group the test started, ended by pid (never `ray stop`)."""
from __future__ import annotations

import os
import re
import signal
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
from treegrpo_ray.loopback import LoopbackCluster, NodeSpec, pin_overrides
from tests.runs import run_on_one_thread

ROOT = Path(__file__).resolve().parent.parent
ITERATIONS = 8
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
            f"iterations={ITERATIONS}", "checkpoint.every=4", "checkpoint.keep=5", *extra]


def metrics(db: str, keys=COMPARED) -> tuple[dict[str, list[tuple[int, float]]], str]:
    client = mlflow.MlflowClient(db)
    (r,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, k)) for k in keys}, \
        r.info.status


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(out / "r" / "checkpoints"))[0]


@pytest.fixture(scope="module")
def in_process(tiny_sd3_dir, tmp_path_factory):
    """The same run in one process on one thread (the actors' thread count)."""
    out = tmp_path_factory.mktemp("in_process")
    run_on_one_thread(load_config("configs/smoke.yaml", overrides(tiny_sd3_dir, out, "mode=local",
                                                                  "tracking.progress=false")))
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


def test_pools_on_three_nodes_lose_each_node_once_and_train_the_same_bits_as_one_process(loopback, tiny_sd3_dir,
                                                                                       tmp_path, in_process):
    # One run: placed on three nodes, three node losses (one cluster and run start instead of four
    # on a 2-core machine; a run without losses equals this one bit for bit, so it would add nothing):
    # after iteration 2's line (iteration 3's sampling in flight) the sampler node, after 4 the
    # reward node, after 6 the learner node (checkpoint at 4: the restored learner replays updates 5
    # and 6 from the driver's log). Each node's raylet, agents and workers are SIGKILLed; 5 s later
    # a node with the same resources joins.
    kills = {2: "sampler", 4: "reward", 6: "learner"}
    joined = []

    def replace_node(node):
        time.sleep(5)
        loopback.add(node)
        joined.append(node)

    def on_line(line):
        it = re.match(r"iter\s+(\d+)/", line)
        if it and int(it.group(1)) in kills:
            node = kills.pop(int(it.group(1)))
            loopback.kill(node)
            threading.Thread(target=replace_node, args=(node,), daemon=True).start()

    code, log = cli_on(loopback, tiny_sd3_dir, tmp_path / "out", on_line)
    assert not kills and code == 0, log[-6000:]
    placed = re.search(r"placement: sampler on node (\w+) \| reward on node (\w+) \| weight store on node (\w+) \| "
                       r"learner on node (\w+) \| driver on node (\w+)", log)
    assert placed, log[-3000:]
    sampler, reward, store, learner, driver = placed.groups()
    assert len({sampler, reward, learner, driver}) == 4 and store == driver  # control actors on the driver's node
    deadline = time.monotonic() + 120
    while len(joined) < 3 and time.monotonic() < deadline:  # the module's next test needs the nodes back
        time.sleep(1)
    print(f"\n--- three nodes lost: the run's log ---\n{log}")
    assert_same_run(tmp_path / "out", in_process, log)  # every iteration once, same values, same final weights
    got, _ = metrics(f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}",
                     ("faults/retried_calls", "perf/actor_restarts", "perf/learner_restarts"))
    steps = {k: {s: v for s, v in got[k]} for k in got}
    # the sampler's loss shows in iterations 3-4, the reward actor's in 5-6, the learner's in 7-8
    assert sum(steps["faults/retried_calls"].get(s, 0) for s in (3, 4)) >= 1, log[-5000:]
    assert sum(steps["faults/retried_calls"].get(s, 0) for s in (5, 6)) >= 1, log[-5000:]
    assert sum(steps["perf/actor_restarts"].values()) >= 2                       # sampler and reward actor
    assert sum(steps["perf/learner_restarts"].get(s, 0) for s in (7, 8)) >= 1, log[-5000:]
    assert re.search(r"the sampler of sampler call 0 lost|a reward chunk of sampler call 0 lost", log)
    assert re.search(r"Ray Train restored the learner group .* and 2 update\(s\) since it", log), log[-5000:]


# ----------------------------------------------------------------------------- the GPU configs, rehearsed

# What a CPU cannot do, swapped; everything else as the config has it (pools, slots, learner workers,
# minibatches, micro_batch, LoRA, gradient checkpointing, sampler_calls, bf16).
CPU_SWAPS = ["model.device=cpu", "model.resolution=32", "pools.sampler.num_gpus=0", "pools.reward.num_gpus=0",
             "learner.resources.num_gpus=0", "pools.sampler.num_cpus=1", "pools.reward.num_cpus=1",
             "learner.resources.num_cpus=1", "iterations=2", "prompts=configs/prompts/example_prompts.txt",
             "tracking.run_name=r", "tracking.sample_grid_every=0",
             # the final evaluation's 32 prompts cost ~5x an iteration's sampling here; 4 still sample
             # on every sampler and score on the reward pool (the batch arithmetic checked is training's)
             "eval_prompts=4"]
REWARD_SWAP = "rewards.terms=[{name: jpeg_compressibility}]"  # HPS-v2.1 needs a download -> a weight-free reward
NO_EVAL_METRICS = "eval_metrics=[]"  # the GPU configs' eval metrics (imagereward, aesthetic, clipscore) need downloads too
GPU_CONFIGS = {  # config -> (tiny pipeline, further swaps with the reason)
    # left out for time: sd35m_hps_clip (this run with two reward terms), flux1dev_hps (LoRA + DDP as
    # sd35m_hps, on the FLUX layout that flux1dev_full rehearses) and, since issue 37, sd15_hps (one
    # actor per pool and one learner worker: the layout the node-loss run above has; its DDIM
    # family trains with LoRA in tests/test_families.py, and `loopback up`'s slot pins for a config
    # without slots are checked by the CLI test below; ~2 min of the integration tier here)
    "sd35m_hps": ("sd35", []),
    # FSDP2 over the learner node's 2 slots (8 GPUs' workers -> 2 CPU processes) and 2 reward actors;
    # bf16 compute on float32 shards, gloo, a gathered checkpoint and export, weights published in buckets
    "flux1dev_full": ("flux", ["learner.workers=2", "pools.rewards=2"]),
}


@pytest.mark.parametrize("name", list(GPU_CONFIGS))
def test_gpu_config_runs_as_written_on_the_cluster(name, loopback, tiny_family_pipelines, tmp_path):
    family, extra = GPU_CONFIGS[name]
    cfg = load_config(name, [])
    out = tmp_path / "out"
    # pin_overrides: the slots `python -m treegrpo_ray.loopback up` tells a config without them to ask for
    argv = ["--config", name, f"model.pretrained={tiny_family_pipelines[family]}", REWARD_SWAP, NO_EVAL_METRICS,
            f"tracking.output_dir={out}", *CPU_SWAPS, *extra, *pin_overrides(cfg)]
    code, log = cli_on(loopback, None, out, argv=argv, timeout=1200)
    assert code == 0, log[-6000:]
    got, status = metrics(f"sqlite:///{out / 'mlflow.db'}",
                          ("learner/decisions", "loss/clip_frac_first", "loss/clip_frac_later", "tree/leaves",
                           "weights/version", "staleness/max_lag"))
    cfg = load_config(name, argv[2:])  # the swaps that change the batch arithmetic (learner.workers) included
    leaves = cfg.prompts_per_iteration * cfg.tree.k ** cfg.tree.depth
    assert status == "FINISHED" and got["tree/leaves"] == [(1, leaves), (2, leaves)]  # none lost or doubled
    assert got["weights/version"] == [(1, 1.0), (2, 2.0)] and got["staleness/max_lag"] == [(1, 0.0), (2, 0.0)]
    decisions = cfg.prompts_per_iteration * sum(cfg.tree.k ** d for d in range(cfg.tree.depth))
    assert [v for _, v in got["learner/decisions"]] == [decisions] * 2  # the config's batch arithmetic
    assert len(got["loss/clip_frac_first"]) == 2 and len(got["loss/clip_frac_later"]) == 2  # minibatches > 1
    placed = re.search(r"placement: sampler on node (\w+) \| reward on node (\w+) \| weight store on node \w+ \| "
                       r"learner on node (\w+) \| driver on node (\w+)", log)
    assert placed and len(set(placed.groups())) == 4, log[-3000:]
    assert (out / "r" / "export").is_dir()
    print(f"\n--- {name}: the run's log ---\n{log[-2500:]}")


# ----------------------------------------------------------------------------- the CLI users run

def test_the_loopback_cli_as_the_readme_runs_it():
    # `up` in one shell; `kill`, `add`, `down` from another; a driver joins with the printed line
    import psutil
    import tempfile
    root = tempfile.mkdtemp(prefix="trg-cli-")  # short: Ray's socket paths
    lb = [sys.executable, "-m", "treegrpo_ray.loopback"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    up = subprocess.Popen([*lb, "up", "--root", root], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    lines = []

    def read_until(text: str, timeout: float = 240) -> str:
        timer = threading.Timer(timeout, up.kill)
        timer.start()
        try:
            for line in up.stdout:
                lines.append(line)
                if text in line:
                    return line
        finally:
            timer.cancel()
        raise AssertionError("".join(lines)[-3000:])

    try:
        read_until("run on it:")
        command = read_until("python -m treegrpo_ray.run")
        assert "pools.sampler.resources.sampler_slot=1" in command and "learner.resources.resources.learner_slot=1" in command
        joined = dict(kv.split("=", 1) for kv in command.split()[:3])  # RAY_ADDRESS=... RAY_AUTH_MODE=... RAY_AUTH_TOKEN=...
        assert joined["RAY_AUTH_MODE"] == "token" and joined["RAY_ADDRESS"].startswith("127.0.0.1:")
        read_until("lose a node:")
        subprocess.run([*lb, "kill", "sampler", "--root", root], cwd=ROOT, check=True, timeout=60)
        read_until("node sampler is gone")
        subprocess.run([*lb, "add", "sampler", "--root", root], cwd=ROOT, check=True, timeout=60)
        read_until("started a replacement sampler node")
        # the lost node counts until Ray has missed its heartbeats (~15-30 s here); then head + 3 live nodes
        probe = ("import ray, time\nray.init()\nt = time.time()\nwhile time.time() - t < 120:\n"
                 "    r, alive = ray.cluster_resources(), sum(n['Alive'] for n in ray.nodes())\n"
                 "    if alive == 4 and r.get('sampler_slot') == 1.0:\n        break\n    time.sleep(1)\n"
                 "print('SLOTS', r.get('sampler_slot'), r.get('reward_slot'), r.get('learner_slot'), alive)")
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **joined}, capture_output=True, text=True,
                             timeout=240)
        assert "SLOTS 1.0 1.0 1.0 4" in out.stdout, out.stdout + out.stderr[-2000:]  # head + 3 live nodes
        subprocess.run([*lb, "down", "--root", root], cwd=ROOT, check=True, timeout=60)
        up.wait(timeout=120)
        assert up.returncode == 0 and "loopback cluster down" in "".join(lines) + up.stdout.read()
        assert not [p for p in psutil.process_iter(["cmdline"]) if root in " ".join(p.info["cmdline"] or [])]
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=120)
