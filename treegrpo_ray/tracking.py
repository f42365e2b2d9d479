"""MLflow tracking, used by the driver only (components return metrics, the driver logs them).

Default store: `sqlite:///<output_dir>/mlflow.db` (MLflow 3's default backend, kept beside the
run outputs); `tracking.mlflow_uri` or $MLFLOW_TRACKING_URI override it. With a file-based store
(sqlite or a directory) the experiment's artifacts (sample grids, the final model) go beside the
store, in `<store dir>/mlartifacts`, not MLflow's default `./mlruns` in whatever directory the
process happens to run in (under `ray job submit`, a temporary copy Ray deletes). A tracking
server decides its own artifact store. Resume re-opens the same MLflow run by id, so step numbers
continue."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch


def tracking_uri(configured: str, output_dir: str) -> str:
    """The MLflow store; output_dir is already absolute (or a URI, which config validation only
    allows together with an explicit store: sqlite cannot live on an object store)."""
    output_dir = str(output_dir)
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in output_dir:
        raise ValueError(f"no MLflow store for a URI output_dir {output_dir}: set tracking.mlflow_uri")
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a file-based store, else the server's choice."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts")
    if uri.startswith("file:") or "://" not in uri:
        path = uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:")
        return str(Path(path).resolve() / "mlartifacts")
    return None


@contextlib.contextmanager
def store_lock(uri: str):
    """An inter-process lock around creating a sqlite store's schema and experiment: without it, two
    runs started at the same moment in one output folder both create the tables (`duplicate column
    name`) or the experiment (`already exists`), and one dies at start-up. Servers lock themselves.
    It is a `flock` on the store's folder itself, so it leaves no lock file behind (in the output
    folder or anywhere else) and the kernel releases it when the process ends. sqlite needs a local
    disk, where flock works; where it does not (no `fcntl`, or a filesystem refusing it) the store
    is opened unlocked, as before this lock existed."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
        fd = os.open(Path(uri[len("sqlite:///"):]).resolve().parent, os.O_RDONLY)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class Tracker:
    """Thin wrapper so the driver reads `tracker.log(metrics, step)`; all MLflow calls live here."""

    def __init__(self, uri: str, experiment: str, run_name: str = "", run_id: str | None = None,
                 artifact_location: str | None = None, verbose: bool = False):
        import logging

        import mlflow
        if not verbose:  # "Creating initial MLflow database tables..." and the like
            logging.getLogger("mlflow").setLevel(logging.WARNING)
        self.mlflow = mlflow
        before = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        # mlflow exports the URI into the environment; undo that so a later run in this process
        # (tests, benchmarks) resolves its own default instead of inheriting this run's store
        if before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before
        with store_lock(uri):  # runs started together in one folder would race on creating the store
            if artifact_location and mlflow.MlflowClient(uri).get_experiment_by_name(experiment) is None:
                mlflow.create_experiment(experiment, artifact_location=Path(artifact_location).as_uri())
            mlflow.set_experiment(experiment)
            self.run = mlflow.start_run(run_id=run_id) if run_id else mlflow.start_run(run_name=run_name or None)
        self.run_id, self.uri = self.run.info.run_id, uri

    def log_params(self, params: dict[str, str]) -> None:
        existing = self.mlflow.get_run(self.run_id).data.params
        fresh = {k: v[:6000] for k, v in params.items() if k not in existing}  # params are immutable in MLflow
        items = list(fresh.items())
        for i in range(0, len(items), 90):
            self.mlflow.log_params(dict(items[i:i + 90]))

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k.replace("@", "_"): float(v) for k, v in metrics.items() if np.isfinite(float(v))}
        if clean:
            self.mlflow.log_metrics(clean, step=step)

    def log_image(self, images: torch.Tensor, name: str, step: int) -> None:
        """images (B, 3, H, W) in [0, 1] -> one grid PNG artifact (clips (B, T, 3, H, W): a frames grid)."""
        grid = make_grid(images)
        self.mlflow.log_image(grid, key=name, step=step)

    def log_artifacts(self, path: str | Path, artifact_path: str) -> None:
        self.mlflow.log_artifacts(str(path), artifact_path=artifact_path)

    def log_bytes(self, data: bytes, filename: str, artifact_path: str | None = None) -> None:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="treegrpo-art-") as d:
            (Path(d) / filename).write_bytes(data)
            self.mlflow.log_artifact(str(Path(d) / filename), artifact_path=artifact_path)

    def history(self, keys) -> dict[str, list[tuple[int, float]]]:
        """{key: [(step, value)]} of this run (all of it, including a resumed run's earlier part)."""
        client = self.mlflow.MlflowClient(self.uri)
        return {k: [(m.step, m.value) for m in client.get_metric_history(self.run_id, k)] for k in keys}

    def last_step(self, key: str) -> int:
        """The last step this run has `key` logged at (0: none). A killed job may have logged
        iterations past its last checkpoint; a resume replays them exactly (same seed) and the
        driver does not log them twice."""
        history = self.mlflow.MlflowClient(self.uri).get_metric_history(self.run_id, key)
        return max((m.step for m in history), default=0)

    def end(self, status: str = "FINISHED") -> None:
        self.mlflow.end_run(status=status)


GRID_FRAMES = 8  # frames per clip in a video's frames grid


def make_grid(images: torch.Tensor, ncol: int = 8, pad: int = 2) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (rows*(H+pad), ncol*(W+pad), 3) uint8. Video clips
    (B, T, 3, H, W) give a frames grid: one row per clip, GRID_FRAMES evenly spaced frames."""
    if images.dim() == 5:
        from treegrpo_ray.rewards.video import frame_indices
        idx = frame_indices(images.shape[1], GRID_FRAMES)
        images, ncol = images[:, idx.to(images.device)].flatten(0, 1), idx.numel()  # (B*n, 3, H, W)
    b, _, h, w = images.shape
    ncol = min(ncol, b)
    nrow = (b + ncol - 1) // ncol
    grid = np.zeros((nrow * (h + pad), ncol * (w + pad), 3), dtype=np.uint8)
    pix = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for i in range(b):
        r, c = divmod(i, ncol)
        grid[r * (h + pad): r * (h + pad) + h, c * (w + pad): c * (w + pad) + w] = pix[i]
    return grid


def log_to_run(uri: str, run_id: str, metrics: dict[str, float], step: int, folder: str | Path,
               artifact_path: str) -> None:
    """Add metrics and a folder of files to an existing run without reopening it (its status, e.g.
    FINISHED or KILLED, stays as the run left it): what `evaluate` does after training."""
    import mlflow
    client = mlflow.MlflowClient(uri)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value, step=step)
    client.log_artifacts(run_id, str(folder), artifact_path)
