"""Checkpoints are written atomically, pruned, and loaded only from safe formats."""
import pickle

import pytest
import torch

from treegrpo_ray.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


class NotATensor:
    """Stands in for an arbitrary pickled object (code execution on load)."""


def _save(root, it, value=1.0, keep=2):
    model = {"w": torch.full((2, 2), value)}
    optim = {"state": {0: {"step": torch.tensor(float(it))}}, "param_groups": [{"lr": 1e-4, "params": [0]}]}
    return save_checkpoint(root, it, model_state=model, optimizer_state=optim, run_state={"next_iteration": it}, keep=keep)


def test_roundtrip_and_prune(tmp_path):
    for it in (1, 2, 3):
        _save(tmp_path, it, value=float(it))
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["iter_000002", "iter_000003"]          # keep=2 pruned iter 1
    model, optim, state = load_checkpoint(latest_checkpoint(tmp_path))
    assert torch.equal(model["w"], torch.full((2, 2), 3.0))
    assert optim["state"][0]["step"].item() == 3.0
    assert state == {"next_iteration": 3}


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    _save(tmp_path, 1)
    # A job killed mid-write leaves a temp dir (and maybe a dir without run_state.json): both ignored.
    (tmp_path / ".tmp-iter_000002-dead").mkdir()
    partial = tmp_path / "iter_000003"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00\x01truncated")
    assert latest_checkpoint(tmp_path).name == "iter_000001"
    with pytest.raises(FileNotFoundError, match="run_state.json"):
        load_checkpoint(partial)


def test_refuses_nonfinite_weights_and_keeps_previous(tmp_path):
    _save(tmp_path, 1)
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(tmp_path, 2, model_state={"w": torch.tensor([float("nan")])}, optimizer_state=None,
                        run_state={}, keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["iter_000001"]
    assert not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


def test_optimizer_state_loads_with_weights_only(tmp_path):
    # A pickle that is not plain tensors/containers must be rejected by weights_only=True.
    path = _save(tmp_path, 1)
    torch.save({"evil": NotATensor()}, path / "optimizer.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)
