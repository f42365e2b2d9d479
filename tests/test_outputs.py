"""Where a run's outputs land, tested the way users run: the real CLI in a subprocess, started from
a fresh working directory (not the repo), with the default relative `tracking.output_dir`.

Default tier: mode=local and mode=ray (a local Ray instance the CLI starts itself, whose workers
run in Ray's temporary folders: the case that once put the model there). Integration tier
(`-m integration`, run by .ci/run after the default tier): an `s3://` output_dir on a real
S3-compatible server (moto's) on loopback, killed mid-run and resumed to the uninterrupted run's
weights: SIGKILL in mode=local, SIGTERM (a preempted pod) in mode=ray.
`ray job submit` is in test_deploy_emulation.py, beside the head it needs.

After every run: checkpoints, export and config.json under `<output_dir>/<run>/`, the MLflow db
and its artifacts (the `final_model` files) beside them, nothing else in the working directory,
and the export loads with plain diffusers and generates an image."""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest
import torch

from treegrpo_ray import storage
from treegrpo_ray.checkpoint import list_checkpoints, load_checkpoint
from treegrpo_ray.config import load_config
from tests.runs import run_on_one_thread

ROOT = Path(__file__).resolve().parent.parent


def user_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_"))}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def fresh_project(tmp_path: Path) -> Path:
    """A user's folder: their config and prompt file, nothing else (the CLI runs from here)."""
    proj = tmp_path / "project"
    proj.mkdir()
    shutil.copy(ROOT / "configs" / "smoke.yaml", proj / "smoke.yaml")
    shutil.copy(ROOT / "configs" / "prompts" / "example_prompts.txt", proj / "prompts.txt")
    return proj


def cli_args(tiny_sd3_dir, *extra) -> list[str]:
    return ["--config", "smoke.yaml", f"model.pretrained={tiny_sd3_dir}", "prompts=prompts.txt",
            "rewards.terms.0.name=jpeg_compressibility", "tracking.run_name=r", *extra]


def run_cli(proj: Path, args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "treegrpo_ray.run", *args], cwd=proj, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-4000:]}"
    return result


def steps_of(db_uri: str, key: str = "reward/combined") -> tuple[str, list[int]]:
    client = mlflow.MlflowClient(db_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("treegrpo").experiment_id])
    assert run.info.status == "FINISHED"
    return run.info.run_id, sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def final_model_files(db_uri: str, run_id: str) -> list[str]:
    client = mlflow.MlflowClient(db_uri)
    return sorted(f.path for f in client.list_artifacts(run_id, "final_model/transformer"))


def generate_with_plain_diffusers(tiny_sd3_dir, export: Path) -> torch.Tensor:
    """What the run's last lines tell the user to do, for a full fine-tune; one 32x32 image."""
    from diffusers import AutoModel, DiffusionPipeline
    transformer = AutoModel.from_pretrained(str(export), subfolder="transformer")
    pipe = DiffusionPipeline.from_pretrained(tiny_sd3_dir, transformer=transformer, text_encoder_3=None,
                                             tokenizer_3=None)  # the tiny test pipeline has no T5
    image = pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    return image


def short_tmp() -> str:
    """Ray's temp root for a CLI-started instance: short, since its socket paths must stay < 108 chars."""
    return tempfile.mkdtemp(prefix="trg-", dir="/tmp")


def assert_figures(run_dir: Path, stdout: str, iterations: int, samples: bool, db: str, run_id: str) -> None:
    """reward_curve.png (and with eval, samples.png of iteration 0 over the last) in the run dir and MLflow."""
    from PIL import Image
    assert Image.open(run_dir / "reward_curve.png").size == (1000, 380)
    figures = [run_dir / "reward_curve.png"]
    if samples:
        assert Image.open(run_dir / "samples" / "iter_000000.png").size == Image.open(
            run_dir / "samples" / f"iter_{iterations:06d}.png").size
        assert Image.open(run_dir / "samples.png").size[0] >= 640
        figures.append(run_dir / "samples.png")
    else:
        assert not (run_dir / "samples.png").exists()
    assert f"figures: {', '.join(map(str, figures))}" in stdout
    logged = sorted(f.path for f in mlflow.MlflowClient(db).list_artifacts(run_id, "report"))
    assert logged == sorted(f"report/{p.name}" for p in figures)


def assert_outputs_in(proj: Path, out: Path, stdout: str, iterations: int, extra=(), samples=False) -> str:
    """The run `r` left everything under `out`; returns its MLflow run id."""
    run_dir = out / "r"
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")][-1] == f"iter_{iterations:06d}"
    assert (run_dir / "export" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run_dir / "config.json").is_file() and (out / "mlflow.db").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted(["mlartifacts", "mlflow.db", "r", *extra])
    db = f"sqlite:///{out / 'mlflow.db'}"
    run_id, steps = steps_of(db)
    assert steps == list(range(1, iterations + 1))
    assert "final_model/transformer/diffusion_pytorch_model.safetensors" in final_model_files(db, run_id)
    assert list((out / "mlartifacts").rglob("diffusion_pytorch_model.safetensors"))  # artifacts beside the db
    assert sorted(p.name for p in proj.iterdir()) == sorted(["smoke.yaml", "prompts.txt", *(
        [out.name] if out.parent == proj else [])]), "the run wrote outside its output_dir (e.g. ./mlruns)"
    # the last lines say where the model is and how to load it
    assert f"trained model: {run_dir / 'export'}" in stdout
    assert f'transformer=AutoModel.from_pretrained("{run_dir / "export"}", subfolder="transformer")' in stdout
    assert f"mlflow ui --backend-store-uri {db}" in stdout
    assert_figures(run_dir, stdout, iterations, samples, db, run_id)
    return run_id


def test_fresh_folder_local_mode_default_output_dir_then_resume(tiny_sd3_dir, tmp_path):
    proj = fresh_project(tmp_path)
    env = user_env()
    first = run_cli(proj, cli_args(tiny_sd3_dir, "mode=local", "eval_every=2"), env)
    assert first.stdout.startswith(f"treegrpo_ray: run dir {proj / 'outputs' / 'r'} |")
    run_id = assert_outputs_in(proj, proj / "outputs", first.stdout, iterations=2, samples=True)
    generate_with_plain_diffusers(tiny_sd3_dir, proj / "outputs" / "r" / "export")

    # resume=latest of a run that has no checkpoint: an error naming where it looked, not a fresh run
    missing = subprocess.run([sys.executable, "-m", "treegrpo_ray.run", *cli_args(
        tiny_sd3_dir, "mode=local", "tracking.run_name=nope", "checkpoint.resume=latest")],
        cwd=proj, env=env, capture_output=True, text=True, timeout=300)
    assert missing.returncode == 2
    assert f"no complete checkpoint under {proj / 'outputs' / 'nope' / 'checkpoints'}" in missing.stderr
    assert "checkpoint.resume=auto" in missing.stderr and not (proj / "outputs" / "nope").exists()

    # resume=auto continues the run that exists: same MLflow run, no step lost or repeated
    resumed = run_cli(proj, cli_args(tiny_sd3_dir, "mode=local", "eval_every=2", "iterations=3",
                                     "checkpoint.resume=auto"), env)
    assert f"resuming at iteration 2 from {proj / 'outputs' / 'r' / 'checkpoints' / 'iter_000002'}" in resumed.stdout
    # the figures cover the whole run: iteration 0's grid (first job) over iteration 3's (this one)
    assert assert_outputs_in(proj, proj / "outputs", resumed.stdout, iterations=3, samples=True) == run_id


@pytest.mark.ray
def test_fresh_folder_on_a_local_ray_instance_outputs_land_in_the_cwd(tiny_sd3_dir, tmp_path):
    # mode=ray (the default): the CLI starts its own local Ray; the learner is a Ray Train worker
    # whose cwd is inside Ray's session folder. Its checkpoints and export must still land here.
    proj = fresh_project(tmp_path)
    ray_tmp = short_tmp()
    result = run_cli(proj, cli_args(tiny_sd3_dir), user_env(RAY_TMPDIR=ray_tmp))
    assert_outputs_in(proj, proj / "outputs", result.stdout, iterations=2, extra=["ray_train"])
    assert not list(Path(ray_tmp).rglob("iter_000002"))                     # nothing in Ray's temp folder
    shutil.rmtree(ray_tmp, ignore_errors=True)
    _, _, state = load_checkpoint(proj / "outputs" / "r" / "checkpoints" / "iter_000002")
    assert state["version"] == 2
    # a healthy run's log is ours: no model-loading bars from each actor, no Ray INFO/error-looking lines
    ours = ("treegrpo_ray:", "iter ", "done:", "trained model:", "load it:", "figures:", "checkpoints:", "MLflow:")
    noise = [line for line in (result.stdout + result.stderr).splitlines() if line.strip() and not line.startswith(ours)]
    assert noise == [], noise


# ----------------------------------------------------------------------------- S3 on loopback

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
          "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3-compatible server as a separate process on 127.0.0.1; yields its endpoint."""
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.3)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def make_bucket(endpoint: str, name: str) -> str:
    import boto3
    client = boto3.client("s3", endpoint_url=f"http://{endpoint}", **{
        "aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"})
    client.create_bucket(Bucket=name)
    return f"s3://{name}/outputs?endpoint_override={endpoint}&scheme=http&region=us-east-1"


@pytest.mark.integration
@pytest.mark.parametrize("mode,sig", [("local", signal.SIGKILL),
                                      pytest.param("ray", signal.SIGTERM, marks=pytest.mark.ray)])
def test_s3_output_dir_survives_a_kill_and_resumes_to_the_uninterrupted_weights(tiny_sd3_dir, tmp_path, s3_server,
                                                                                 mode, sig, monkeypatch):
    """mode=local: SIGKILL to the job's process group mid-run (checkpoint 3 may be mid-upload).
    mode=ray: SIGTERM to the driver alone, as Kubernetes preempts a pod (it was test_preemption's
    Ray case, on local disk): the driver abandons the iteration in flight, checkpoints the last
    completed update to the bucket and exits 143. Either way `checkpoint.resume=latest` continues
    the same MLflow run to the weights of an uninterrupted in-process run, bit for bit."""
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    root = make_bucket(s3_server, f"runs-{mode}")
    proj = fresh_project(tmp_path)
    db = f"sqlite:///{proj / 'mlflow.db'}"
    env = user_env(**S3_ENV, RAY_TMPDIR=short_tmp())
    args = cli_args(tiny_sd3_dir, f"mode={mode}", f"tracking.output_dir={root}",
                    f"tracking.mlflow_uri={db}", "iterations=4", "checkpoint.keep=2", "tracking.progress=true")
    job = subprocess.Popen([sys.executable, "-m", "treegrpo_ray.run", *args], cwd=proj, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines, at = [], (3 if sig == signal.SIGKILL else 2)
    try:
        for line in job.stdout:
            lines.append(line)
            if re.match(rf"iter\s+{at}/4 ", line):
                if sig == signal.SIGKILL:
                    os.killpg(job.pid, signal.SIGKILL)  # the driver and the Ray it started; checkpoint 2 is complete
                    break
                job.send_signal(signal.SIGTERM)         # the driver alone, and read on to its exit
        job.wait(timeout=600)
    finally:
        job.kill()
        job.wait(timeout=60)
        try:
            os.killpg(job.pid, signal.SIGKILL)          # whatever of its Ray outlived it (nothing, normally)
        except ProcessLookupError:
            pass
    log = "".join(lines)
    checkpoints = storage.join(root, "r", "checkpoints")
    before = [storage.name(c) for c in list_checkpoints(checkpoints)]
    if sig == signal.SIGKILL:
        assert job.returncode == -signal.SIGKILL, log[-3000:]
        assert before[-1] in ("iter_000002", "iter_000003"), before
    else:
        assert job.returncode == 143, log[-4000:]
        assert "SIGTERM received" in log and "*** SIGTERM received" not in log  # ours, not Ray's abort
        # checkpoint.every=1: the iteration it stops after has its checkpoint already, or gets it now
        stopped = re.search(r"stopped after iteration (\d) of 4, (its )?checkpoint (was already )?written", log)
        assert stopped, log[-3000:]
        done = int(stopped.group(1))
        assert done in (2, 3)  # iteration 3 abandoned (its sampling was in flight) or finished
        assert before == [f"iter_{i:06d}" for i in (done - 1, done)], before
        client = mlflow.MlflowClient(db)
        (r,) = client.search_runs([client.get_experiment_by_name("treegrpo").experiment_id])
        assert r.info.status == "KILLED"
        assert sorted(m.step for m in client.get_metric_history(r.info.run_id, "reward/combined")) == list(range(1, done + 1))

    resumed = run_cli(proj, args[:-1] + ["checkpoint.resume=latest"], env)
    assert f"resuming at iteration {int(before[-1][5:])}" in resumed.stdout
    run_id, steps = steps_of(db)
    assert steps == [1, 2, 3, 4]                                   # one MLflow run, no step lost or repeated
    client = mlflow.MlflowClient(db)
    lags = [m.value for m in client.get_metric_history(run_id, "staleness/max_lag")]
    assert lags == [0.0] * 4      # the resumed samplers grew their first trees with the restored version
    assert [storage.name(c) for c in list_checkpoints(checkpoints)] == ["iter_000003", "iter_000004"]  # pruned
    got, _, state = load_checkpoint(list_checkpoints(checkpoints)[-1])
    assert state["next_iteration"] == 4 and state["mlflow_run_id"] == run_id
    export = storage.join(root, "r", "export")
    assert f"trained model: {export}" in resumed.stdout
    assert "final_model/transformer/diffusion_pytorch_model.safetensors" in final_model_files(db, run_id)
    assert sorted(p.name for p in proj.iterdir()) == ["mlartifacts", "mlflow.db", "prompts.txt", "smoke.yaml"]
    local = storage.download_dir(export, tmp_path / "export")
    generate_with_plain_diffusers(tiny_sd3_dir, local)
    # the reward curve went to the bucket too, covering the killed job's iterations as well
    from PIL import Image
    curve = storage.read_bytes(storage.join(root, "r", "reward_curve.png"))
    assert Image.open(io.BytesIO(curve)).size == (1000, 380)
    assert f"figures: {storage.join(root, 'r', 'reward_curve.png')}" in resumed.stdout
    # the same run uninterrupted, in this process (== mode=ray for the same seed: test_system.py)
    monkeypatch.chdir(proj)
    ref = tmp_path / "ref"
    run_on_one_thread(load_config("smoke.yaml", [a for a in args[2:] if not a.startswith(("mode=", "tracking.output_dir=", "tracking.mlflow_uri=",
                                                                                   "tracking.progress="))]
                                  + ["mode=local", f"tracking.output_dir={ref}", "tracking.progress=false"]))
    want = load_checkpoint(list_checkpoints(ref / "r" / "checkpoints")[-1])[0]
    assert max(float((got[k] - want[k]).abs().max()) for k in want) == 0.0
