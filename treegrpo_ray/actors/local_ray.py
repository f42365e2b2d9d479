"""The local Ray instance a run starts is the run's own, and goes with it.

`ray.shutdown()` stops it when the driver ends normally. A driver killed with SIGKILL cannot
clean up, and Ray 2.60 then leaves its `ray::DashboardAgent` and `ray::RuntimeEnvAgent` behind
(they outlive the raylet and ignore SIGTERM); a resumed run would start a second instance beside
them. So a driver that starts an instance writes its pid into the session directory
(`treegrpo_driver.json`), and the next driver that starts one first kills the processes that
still hold files open in a session whose recorded driver is gone. Sessions without that file,
other people's clusters and `ray start` heads among them, are never touched.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

MARK = "treegrpo_driver.json"


def record_session() -> None:
    """Mark the instance this process just started (ray.init) as this driver's."""
    import psutil
    import ray
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    me = psutil.Process()
    Path(session_dir, MARK).write_text(json.dumps({"pid": me.pid, "create_time": me.create_time()}))


def _session_of(path: str) -> str | None:
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.startswith("session_") and part != "session_latest":
            return str(Path(*parts[:i + 1]))
    return None


def _driver_gone(session: str, cache: dict[str, bool]) -> bool:
    if session not in cache:
        import psutil
        try:
            mark = json.loads(Path(session, MARK).read_text())
        except (OSError, ValueError):
            cache[session] = False  # not a session a treegrpo_ray driver started
            return False
        try:
            alive = abs(psutil.Process(mark["pid"]).create_time() - mark["create_time"]) < 1.0
        except psutil.NoSuchProcess:
            alive = False
        cache[session] = not alive
    return cache[session]


def reap_orphans() -> list[int]:
    """Kill what dead treegrpo_ray drivers' local Ray instances left running; returns the pids."""
    import psutil
    killed, cache = [], {}
    for proc in psutil.process_iter(["pid", "name"]):
        if proc.pid == os.getpid():
            continue
        try:
            sessions = {_session_of(f.path) for f in proc.open_files()} - {None}
            if any(_driver_gone(s, cache) for s in sessions):
                proc.kill()
                killed.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return killed
