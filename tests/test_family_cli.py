"""Qwen-Image and Wan2.1 the way a user trains their own model (issue 36): the real CLI in a
subprocess, from a fresh folder holding only their config and prompts, `model.pretrained=<dir>` a
tiny pipeline of the family's real structure, the default relative output_dir, mode=local. The
run trains, exports what its last lines say how to load, and (Wan) leaves eval clips in its run
folder. Integration tier: two CLI runs, ~1-2 min."""
import json
import re

import pytest
import torch

from tests.test_outputs import fresh_project, run_cli, user_env

pytestmark = pytest.mark.integration

ARGS = {"qwenimage": ["model.resolution=16", "model.max_sequence_length=8", "model.true_cfg_scale=4.0"],
        "wan": ["model.resolution=32", "model.num_frames=9", "model.max_sequence_length=8", "eval_every=2",
                "eval_prompts=2", "eval_images_per_prompt=1"]}


@pytest.mark.parametrize("family", ["qwenimage", "wan"])
def test_a_new_family_trains_and_exports_through_the_cli(tiny_family_pipelines, tmp_path, family):
    from diffusers import AutoModel, DiffusionPipeline

    proj = fresh_project(tmp_path)
    pipeline = tiny_family_pipelines[family]
    out = run_cli(proj, ["--config", "smoke.yaml", f"model.pretrained={pipeline}", "prompts=prompts.txt",
                         "rewards.terms.0.name=jpeg_compressibility", "tracking.run_name=r", "mode=local",
                         *ARGS[family]], user_env()).stdout
    run_dir = proj / "outputs" / "r"
    assert (run_dir / "export" / "transformer" / "config.json").is_file()
    written = json.loads((run_dir / "config.json").read_text())
    assert written["model"]["pretrained"] == str(pipeline) and written["mode"] == "local"
    # the run's own "load it" line is what loads the export in plain diffusers
    line = next(l for l in out.splitlines() if l.startswith("load it:"))
    if family == "wan":  # diffusers ignores transformer= for WanPipeline: the line assigns it
        assert re.search(r"pipe\.transformer = AutoModel\.from_pretrained\(", line)
    pipe = DiffusionPipeline.from_pretrained(str(pipeline))
    trained = AutoModel.from_pretrained(str(run_dir / "export"), subfolder="transformer")
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, pipe.transformer.state_dict()[n])]
    assert changed, "the export equals the base transformer: the run trained nothing"
    if family == "wan":  # eval clips: GIFs and a frames grid, before (iteration 0) and after (2)
        samples = run_dir / "samples"
        assert sorted(p.name for p in samples.glob("iter_*.png")) == ["iter_000000.png", "iter_000002.png"]
        assert len(list(samples.glob("iter_000002_clip*.gif"))) >= 1
