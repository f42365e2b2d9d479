"""A run's own local Ray instance does not outlive a SIGKILLed driver into the next run
(actors/local_ray.py): the real Ray 2.60 leftovers, found and stopped."""
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from treegrpo_ray.actors.local_ray import MARK, reap_orphans

ROOT = Path(__file__).resolve().parent.parent
DRIVER = """
import os, ray
from treegrpo_ray.actors.ray_system import connect
from treegrpo_ray.config import load_config
connect(load_config("configs/smoke.yaml", ["pools.sampler.num_cpus=1"]))
print(ray._private.worker._global_node.get_session_dir_path(), flush=True)
os.kill(os.getpid(), 9)
"""


def holders(session: str) -> list[int]:
    found = []
    for proc in psutil.process_iter():
        try:
            if any(f.path.startswith(session) for f in proc.open_files()):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.ray
def test_processes_a_killed_drivers_ray_left_are_stopped_by_the_next_run():
    tmp = tempfile.mkdtemp(prefix="trg-", dir="/tmp")  # Ray's socket paths must stay short
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=tmp, RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    session = out.stdout.strip().splitlines()[-1]
    assert Path(session, MARK).is_file()
    time.sleep(3)                                   # the raylet notices its driver died and exits
    left = holders(session)
    assert left, "Ray left nothing behind: this test no longer sees the leak it guards against"
    agents = [p for p in left if "Agent" in psutil.Process(p).name()]  # ray::DashboardAgent / RuntimeEnvAgent
    assert agents, {psutil.Process(p).name() for p in left}
    killed = reap_orphans()
    assert set(agents) <= set(killed)  # the leak: they outlive the raylet and ignore SIGTERM
    # the rest were reaped too, or had exited by themselves in the meantime (a loaded machine is slow to)
    assert all(p in killed or not psutil.pid_exists(p) for p in left), (left, killed)
    deadline = time.monotonic() + 10
    while holders(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert holders(session) == []
