"""Checkpoints: safetensors for weights, torch.save'd optimizer state loaded with
weights_only=True, plain JSON for run state, under a local/NFS path or an object-store URI
(treegrpo_ray.storage).

Atomic either way, so a checkpoint half-written when the job dies is never loaded: on a local
filesystem it is written to a temporary directory and renamed into place; on an object store
(no rename) the files are uploaded with `run_state.json` last, and a checkpoint counts as
complete only when its `run_state.json` is there, which every reader requires."""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from treegrpo_ray import storage

_NAME = re.compile(r"^iter_(\d{6,})$")
MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "run_state.json"


def save_checkpoint(root: str | Path, iteration: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict | None, run_state: dict, keep: int = 2) -> Path | str:
    """Write checkpoint `root/iter_<iteration>` atomically and prune to the newest `keep`.
    Returns its location (a Path when local, else a URI string)."""
    for key, t in model_state.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"refusing to checkpoint non-finite weights ({key}); the previous checkpoint is kept")
    if not storage.is_local(str(root)):
        return _save_remote(str(root), iteration, model_state, optimizer_state, run_state, keep)
    root = Path(storage.filesystem(str(root))[1])
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    _write(tmp, model_state, optimizer_state, run_state)
    _fsync_dir(tmp)
    if final.exists():  # a re-run of the same iteration after resume: replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for stale in root.glob(".tmp-iter_*"):  # half-written by a killed job (one writer per run dir)
        shutil.rmtree(stale, ignore_errors=True)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write(d: Path, model_state, optimizer_state, run_state) -> None:
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(d / MODEL_FILE))
    if optimizer_state is not None:
        torch.save(optimizer_state, d / OPTIM_FILE)
    (d / STATE_FILE).write_text(json.dumps(run_state, indent=2, sort_keys=True))


def _save_remote(root: str, iteration: int, model_state, optimizer_state, run_state, keep: int) -> str:
    final = storage.join(root, f"iter_{iteration:06d}")
    storage.delete_dir(final)  # a re-run of the same iteration after resume: replace it whole
    with tempfile.TemporaryDirectory(prefix="treegrpo-ckpt-") as d:
        _write(Path(d), model_state, optimizer_state, run_state)
        for f in (MODEL_FILE, OPTIM_FILE, STATE_FILE):  # the completion marker, run_state.json, last
            if (Path(d) / f).is_file():
                storage.upload_file(Path(d) / f, storage.join(final, f))
    for old in list_checkpoints(root)[:-keep]:
        storage.delete_dir(str(old))
    return final


def list_checkpoints(root: str | Path) -> list[Path] | list[str]:
    """Complete checkpoints under root, oldest first (temporary dirs are ignored). Paths when
    local, URI strings on an object store."""
    if not storage.is_local(str(root)):
        found = [c for c in storage.list_dirs(str(root)) if _NAME.match(storage.name(c))
                 and storage.is_file(storage.join(c, STATE_FILE)) and storage.is_file(storage.join(c, MODEL_FILE))]
        return sorted(found, key=lambda c: int(_NAME.match(storage.name(c)).group(1)))
    root = Path(storage.filesystem(str(root))[1])
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | str | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_run_state(path: str | Path) -> dict:
    """A checkpoint's run_state.json alone (no weights read), after checking it is complete."""
    for f in (MODEL_FILE, STATE_FILE):
        if not storage.is_file(storage.join(str(path), f)):
            raise FileNotFoundError(f"checkpoint {path} has no {f}; it is incomplete or not a checkpoint "
                                    "directory (use checkpoint.resume=latest to pick the newest complete one)")
    return json.loads(storage.read_text(storage.join(str(path), STATE_FILE)))


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model_state, optimizer_state or None, run_state). Loads only safe formats."""
    state = read_run_state(path)
    with storage.local_copy(str(path)) as d:
        model = load_file(str(d / MODEL_FILE))
        optim = torch.load(d / OPTIM_FILE, weights_only=True) if (d / OPTIM_FILE).is_file() else None
        if not storage.is_local(str(path)):  # the download is deleted on exit: own the tensors
            model = {k: v.clone() for k, v in model.items()}
    return model, optim, state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export(policy, location: str | Path, state: dict | None = None) -> str:
    """policy.export (diffusers' own file layout: a LoRA file, or `transformer/`) written to a
    local path or URI; returns the location. state: a sharded learner's gathered weights."""
    location = str(location)
    with storage.staged_dir(location) as d:
        policy.export(d, state)
    return location
