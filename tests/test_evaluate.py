"""`python -m treegrpo_ray.evaluate` as a user runs it: a short local training run from a fresh
folder through the CLI, then evaluate on its run folder, also through the CLI. The table it prints
is the JSON and CSV it writes, the grid is base over trained, the scores reach the run's MLflow run
and leave its status as it was; bad input stops before any model loads. And `miniature_colour`,
the miniature's metric that no network computes, by hand on rendered scenes."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from PIL import Image

from tests.test_outputs import user_env
from treegrpo_ray.miniature.world import render_batch
from treegrpo_ray.rewards.reward_model import build_scorer

ROOT = Path(__file__).resolve().parent.parent


def cli(module: str, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=user_env(PYTHONPATH=str(ROOT)),
                          capture_output=True, text=True, timeout=600)


def test_evaluate_a_run_folder_from_the_cli(tmp_path):
    train = cli("treegrpo_ray.run", "--config", "smoke", "mode=local", "tracking.run_name=r", "eval_prompts=4",
                "eval_every=1", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "r"
    # during training: the metric it does not train on (eval_metrics=auto: miniature_colour), its drift
    assert re.search(r"done: eval reward [\d.]+ -> [\d.]+ \| miniature_colour \(not trained on\) [\d.]+ -> [\d.]+ ",
                     train.stdout), train.stdout[-2000:]

    out = cli("treegrpo_ray.evaluate", "outputs/r", "images_per_prompt=1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads((run_dir / "evaluation" / "evaluation.json").read_text())["rows"]
    # the run's training reward and the metric it does not train on, on its eval and held-out prompts
    assert [(r["set"], r["metric"]) for r in rows] == [("eval", "miniature"), ("eval", "miniature_colour"),
                                                      ("held_out", "miniature"), ("held_out", "miniature_colour")]
    assert [r["images"] for r in rows] == [4, 4, 24, 24]
    for r in rows:  # printed as written
        assert f"{r['base']:>9.4f} {r['trained']:>9.4f} {r['change']:>+9.4f}" in out.stdout
        assert 0 <= r["base"] <= 1 and 0 <= r["trained"] <= 1
        if r["base"] < 1:  # (r - r_base) / (r_max - r_base), r_max = 1; undefined (null) at r_base = r_max
            assert r["normalised"] == pytest.approx((r["trained"] - r["base"]) / (1 - r["base"]))
        else:
            assert r["normalised"] is None
    with open(run_dir / "evaluation" / "evaluation.csv") as f:
        assert [float(r["trained"]) for r in csv.DictReader(f)] == pytest.approx([r["trained"] for r in rows])
    grid = Image.open(run_dir / "evaluation" / "evaluation.png")
    assert grid.size[0] > grid.size[1]  # 4 columns, 2 rows (base over trained)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'outputs' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"  # evaluate adds to the run, it does not reopen it
    assert run.data.metrics["evaluate/held_out/miniature_colour/trained"] == pytest.approx(rows[3]["trained"])
    steps = {k: [m.step for m in client.get_metric_history(run.info.run_id, k)]
             for k in ("eval/miniature_colour", "eval_held_out/miniature_colour", "drift/miniature_colour")}
    assert steps == {"eval/miniature_colour": [0, 1, 2], "eval_held_out/miniature_colour": [0, 1, 2],
                     "drift/miniature_colour": [1, 2]}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")} == {
        "evaluation/evaluation.json", "evaluation/evaluation.csv", "evaluation/evaluation.png"}

    # the run's export folder (what plain diffusers loads) is the last checkpoint's weights: evaluated
    # again from there, on the same noise, it gives the same table
    exported = cli("treegrpo_ray.evaluate", "outputs/r/export", "images_per_prompt=1", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert f"trained: {run_dir / 'export'}" in exported.stdout
    assert json.loads((run_dir / "evaluation" / "evaluation.json").read_text())["rows"] == rows

    for args, message in ((["outputs"], "is not a run folder (no config.json)"),
                          (["outputs/r/export", "checkpoint=outputs/r"], "an export folder holds the trained weights"),
                          (["outputs/r", "metrics=[aesthetics]"], "metrics: ['aesthetics']"),
                          (["outputs/r", "metrics=[aesthetic]"], "metrics: aesthetic: LAION aesthetic predictor head "
                           "'aesthetic-model.pth' was not given as a path and is not in the Hugging Face cache"),
                          (["outputs/r", "checkpoint=outputs/r"], "not a complete checkpoint"),
                          (["outputs/r", "steps=3"], "expected key=value with key one of")):
        bad = cli("treegrpo_ray.evaluate", *args, cwd=tmp_path)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr[-2000:]
        assert "Traceback" not in bad.stderr


def test_miniature_colour_by_hand():
    score, _ = build_scorer({"name": "miniature_colour"})
    prompts = ["a red circle on the left and a blue square on the right",
               "a green triangle on the left and a yellow circle on the right"]
    images = render_batch(prompts, torch.Generator().manual_seed(0))
    assert score(images, prompts).tolist() == [1.0, 1.0]
    swapped = ["a red circle on the left and a red square on the right",     # right side wrong
               "a red triangle on the left and a green circle on the right"]  # both wrong
    assert score(images, swapped).tolist() == [0.5, 0.0]
    blank = torch.full((1, 3, 32, 32), 0.12)                                   # the background only
    assert score(blank, prompts[:1]).tolist() == [0.0]
    nan = images.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert torch.isnan(score(nan, prompts)[0]) and score(nan, prompts)[1] == 1.0
    with pytest.raises(ValueError, match="miniature_colour scores miniature-world prompts only"):
        score(images, ["a photo of a cat", prompts[1]])


def test_drift_warns_only_when_the_reward_rises_and_a_watched_metric_falls_beyond_its_noise():
    from treegrpo_ray.drift import DriftWatch
    watch = DriftWatch(["colour"])
    first = {"reward": torch.tensor([0.2, 0.3, 0.4, 0.5]), "colour": torch.tensor([1.0, 1.0, 0.5, 1.0])}
    assert watch.observe(first) == ({}, None)  # the baseline
    # reward +0.1 on every image; colour -0.5 on every image but one: mean -0.375, s.e. 0.125 -> beyond 2 s.e.
    m, line = watch.observe({"reward": first["reward"] + 0.1, "colour": torch.tensor([0.5, 0.5, 0.0, 1.0])})
    assert m["drift/reward"] == pytest.approx(0.1) and m["drift/colour"] == pytest.approx(-0.375)
    assert m["drift/colour_stderr"] == pytest.approx(0.125)
    assert line and "possible reward hacking" in line and "colour -0.3750 ± 0.1250" in line
    # a fall within 2 s.e. (one image of four): no warning
    assert watch.observe({"reward": first["reward"] + 0.1, "colour": torch.tensor([1.0, 1.0, 0.5, 0.0])})[1] is None
    # the reward fell too: a collapse, not hacking
    assert watch.observe({"reward": first["reward"] - 0.1, "colour": torch.tensor([0.5, 0.5, 0.0, 0.0])})[1] is None
    assert DriftWatch([]).observe(first) == ({}, None)


def test_miniature_colour_on_other_prompts_stops_at_preflight():
    from treegrpo_ray import builders
    from treegrpo_ray.config import load_config
    from treegrpo_ray.config import ConfigError
    cfg = load_config("smoke", ["prompts=configs/prompts/example_prompts.txt", "eval_metrics=[miniature_colour]"])
    with pytest.raises(ConfigError, match="miniature_colour scores the miniature world's prompts only"):
        builders.preflight(cfg)
    assert builders.eval_metrics(load_config("smoke", ["prompts=configs/prompts/example_prompts.txt"])) == []
    assert builders.eval_metrics(load_config("smoke", [])) == ["miniature_colour"]


@pytest.mark.parametrize("lora_rank", [4, 0])
def test_an_export_folder_loads_back_into_the_policy(tiny_sd3_dir, tmp_path, lora_rank):
    # evaluate <run>/export: the exported weights (LoRA through peft, or the whole denoiser) are
    # the trained policy's, bit for bit
    from treegrpo_ray.evaluate import is_export, load_export
    from treegrpo_ray.models.policy import DiffusionPolicy
    trained = DiffusionPolicy.from_pretrained(tiny_sd3_dir, max_sequence_length=8, lora_rank=lora_rank)
    with torch.no_grad():
        for p in trained.denoiser.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    trained.export(tmp_path / "export")
    assert is_export(tmp_path / "export") and not is_export(tmp_path)
    fresh = DiffusionPolicy.from_pretrained(tiny_sd3_dir, max_sequence_length=8, lora_rank=lora_rank)
    want = dict(trained.broadcast_tensors())
    assert any(not torch.equal(t, want[n]) for n, t in fresh.broadcast_tensors())   # the base differs
    load_export(fresh, tmp_path / "export")
    assert all(torch.equal(t, want[n]) for n, t in fresh.broadcast_tensors())
