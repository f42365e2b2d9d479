"""Local emulation of deploy/smoke/rayjob.yaml: its entrypoint, submitted with `ray job submit`, on a
Ray head that offers what the manifest's pods offer.

The head runs on this machine with the dashboard on 127.0.0.1, the logical CPUs and the custom
resources of all the manifest's pods added up (head num-cpus + replicas x per-pod CPUs, replicas x
`<pool>_slot`), and token auth on, as KubeRay's `authOptions: {mode: token}` sets it: RAY_AUTH_MODE
=token and RAY_AUTH_TOKEN in every Ray process and in the submitter. HOME and Ray's temp dir are
private to the test, so a stray ~/.ray/auth_token or another local cluster cannot interfere.

The head is stopped by signalling the process group this test started (`ray stop` would stop every
Ray process of the machine, other people's clusters included).
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.render_pods import cluster_spec, load_manifests

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
SMOKE = next(d for p, d in load_manifests() if p.parent.name == "smoke" and d["kind"] == "RayJob")
UPLOAD_EXCLUDES = [".git", "**/__pycache__", "*.egg-info", "outputs", "mlruns", "*.db", ".pytest_cache"]

# the whole module is in the integration tier: its head (~40 s to start and stop) and the smoke
# entrypoint's job (~60 s) are the slowest part of the default tier otherwise
pytestmark = [pytest.mark.ray, pytest.mark.integration]


def manifest_offer(doc: dict) -> tuple[float, dict[str, float]]:
    """(logical CPUs, custom resources) that all pods of the manifest give the Ray cluster."""
    spec = cluster_spec(doc)
    cpus = float(spec["headGroupSpec"]["rayStartParams"]["num-cpus"])
    custom: dict[str, float] = {}
    for group in spec["workerGroupSpecs"]:
        params = group["rayStartParams"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        cpus += group["replicas"] * float(params.get("num-cpus", limits["cpu"]))
        for name, amount in json.loads(params["resources"][1:-1].replace("\\", "")).items():
            custom[name] = custom.get(name, 0) + group["replicas"] * amount
    return cpus, custom


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # it answered (401 without a token): it is up
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dashboard on 127.0.0.1:{port} not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def emulated_head():
    """A Ray head shaped like the smoke manifest; yields (dashboard port, client env)."""
    cpus, custom = manifest_offer(SMOKE)
    tmp = Path(tempfile.mkdtemp(prefix="trg-"))  # short: Ray's socket paths must stay < 108 chars
    (tmp / "home").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HOME=str(tmp / "home"), PATH=f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf"), PYTHONUNBUFFERED="1")
    dash = _free_port()
    cmd = [RAY, "start", "--head", "--block", "--port", str(_free_port()),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
           "--ray-client-server-port", str(_free_port()), "--dashboard-agent-listen-port", str(_free_port()),
           "--num-cpus", str(int(cpus)), "--num-gpus", "0", "--resources", json.dumps(custom),
           "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"]
    log = tmp / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        _wait_for_dashboard(dash, head, log)
        yield dash, env
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # our own process group only
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def submit(port: int, env: dict, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
    cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": UPLOAD_EXCLUDES}), "--", *argv]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_emulated_head_offers_the_manifest_resources_behind_token_auth(emulated_head):
    port, env = emulated_head
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/jobs/", timeout=10)
    assert refused.value.code in (401, 403)
    cpus, custom = manifest_offer(SMOKE)
    probe = ("import json, ray; ray.init(); r = ray.cluster_resources(); "
             f"want = {json.dumps(custom)}; assert r['CPU'] == {cpus}, r; "
             "assert all(r.get(k) == v for k, v in want.items()), r; print('EMULATION_OK')")
    result = submit(port, env, ["python", "-c", probe], timeout=300)
    assert result.returncode == 0 and "EMULATION_OK" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


def test_smoke_manifest_entrypoint_succeeds(emulated_head, tmp_path):
    port, env = emulated_head
    argv = shlex.split(SMOKE["spec"]["entrypoint"])
    # The manifest's /mnt/outputs is a volume there; here a temp dir (later overrides win).
    argv += ["iterations=1", f"tracking.output_dir={tmp_path / 'outputs'}"]
    result = submit(port, env, argv, timeout=540)
    tail = result.stdout[-4000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert "succeeded" in result.stdout, tail


def test_ray_job_submit_from_a_fresh_folder_keeps_outputs_and_resumes(emulated_head, tiny_sd3_dir, tmp_path):
    # The README's cluster command as a user types it: from their own folder, `--working-dir .`,
    # default (relative) tracking.output_dir. The job's cwd is Ray's temporary copy of the folder,
    # so outputs go to ~/treegrpo_ray/outputs on the head (HOME is the test's), said in the log.
    from tests.test_outputs import assert_outputs_in, fresh_project, steps_of
    port, env = emulated_head
    proj = fresh_project(tmp_path)
    out = Path(env["HOME"]) / "treegrpo_ray" / "outputs"

    def job(*extra):
        cmd = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", ".", "--",
               "python", "-m", "treegrpo_ray.run", "--config", "smoke.yaml", f"model.pretrained={tiny_sd3_dir}",
               "prompts=prompts.txt", "rewards.terms.0.name=jpeg_compressibility", "tracking.run_name=r", *extra]
        result = subprocess.run(cmd, env=env, cwd=proj, capture_output=True, text=True, timeout=540)
        assert result.returncode == 0 and "succeeded" in result.stdout, result.stdout[-4000:] + result.stderr[-3000:]
        return result.stdout

    first = job()
    assert f"under ray job submit; outputs go to {out} on the head node" in first
    run_id = assert_outputs_in(proj, out, first, iterations=2, extra=["ray_train"])
    resumed = job("iterations=3", "checkpoint.resume=latest")
    assert f"resuming at iteration 2 from {out / 'r' / 'checkpoints' / 'iter_000002'}" in resumed
    assert assert_outputs_in(proj, out, resumed, iterations=3, extra=["ray_train"]) == run_id
    assert steps_of(f"sqlite:///{out / 'mlflow.db'}")[1] == [1, 2, 3]
    shutil.rmtree(out.parent, ignore_errors=True)
