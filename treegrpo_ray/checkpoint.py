"""Checkpoints: safetensors for weights, torch.save'd optimizer state loaded with
weights_only=True, plain JSON for run state. Written to a temporary directory and renamed into
place, so a checkpoint half-written when the job dies is never loaded."""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

_NAME = re.compile(r"^iter_(\d{6,})$")
MODEL_FILE, OPTIM_FILE, STATE_FILE = "model.safetensors", "optimizer.pt", "run_state.json"


def save_checkpoint(root: str | Path, iteration: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict | None, run_state: dict, keep: int = 2) -> Path:
    """Write checkpoint `root/iter_<iteration>` atomically and prune to the newest `keep`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter_{iteration:06d}"
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    for name, t in model_state.items():
        if not torch.isfinite(t).all():
            shutil.rmtree(tmp)
            raise ValueError(f"refusing to checkpoint non-finite weights ({name}); the previous checkpoint is kept")
    save_file({k: v.detach().contiguous().cpu() for k, v in model_state.items()}, str(tmp / MODEL_FILE))
    if optimizer_state is not None:
        torch.save(optimizer_state, tmp / OPTIM_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(run_state, indent=2, sort_keys=True))
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


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary dirs are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _NAME.match(p.name) and (p / STATE_FILE).is_file() and (p / MODEL_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None, dict]:
    """(model_state, optimizer_state or None, run_state). Loads only safe formats."""
    path = Path(path)
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"checkpoint {path} has no {name}; it is incomplete or not a checkpoint "
                                    "directory (use checkpoint.resume=latest to pick the newest complete one)")
    model = load_file(str(path / MODEL_FILE))
    optim = torch.load(path / OPTIM_FILE, weights_only=True) if (path / OPTIM_FILE).is_file() else None
    return model, optim, json.loads((path / STATE_FILE).read_text())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
