"""Write MODEL_CARD.md for the miniature assets from a build report (see `build.py`)."""
from __future__ import annotations

import os

from tools.miniature import components
from treegrpo_ray.miniature import world


def _dir_mb(path: str) -> float:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 2**20


def _row(name: str, m: dict) -> str:
    return (f"| {name} | {m['reward_mean']:.3f} | {m['top1_acc']:.3f} | {m['colour_acc']:.3f} "
            f"| {m['shape_acc']:.3f} |")


FLAW_WHY = {
    "recolour": "in that fraction of its training images every yellow object is drawn green, the caption "
                "unchanged, so the base model draws yellow as green in unseen prompts too (colour accuracy "
                "below) and RL on the training prompts has a prompt-general error to fix; without it the "
                "base model's held-out errors are binding errors that no training on seen combinations "
                "fixes (issue 15, BENCHMARKS.md §12).",
}


def write_model_card(out: str, report: dict) -> str:
    m, ev, p = report["metrics"], report["evaluation"], report["params"]
    steps = report["steps"]
    defect = report.get("flow_defect", "none")  # tools.miniature.build.flawed_renders
    lines = [
        "# Miniature world: tiny SD3 pipeline + open_clip reward",
        "",
        "The embedded default of treegrpo_ray (DESIGN.md §3): a text-to-image flow model of the SD3",
        "architecture and a reward model for a synthetic world of coloured shapes, both trained by",
        "the project on CPU. Built by (nothing downloaded):",
        "",
        "```",
        f"python -m tools.miniature.build --out treegrpo_ray/assets/miniature --seed {report['seed']} "
        f"--vae-steps {steps['vae']} --reward-steps {steps['reward']} --flow-steps {steps['flow']} "
        f"--per-prompt {report['per_prompt']} --threads {report['threads']}"
        + (f" --flow-defect {defect}" if defect != "none" else ""),
        "```",
        "",
        f"Training took {m['build/train_minutes']:.1f} min (VAE {m['vae/seconds'] / 60:.1f}, reward "
        f"{m['reward/seconds'] / 60:.1f}, flow {m['flow/seconds'] / 60:.1f}) with {report['threads']} torch "
        "thread(s) on a 2-core CPU shared with other jobs (timings swing with the load); "
        f"with evaluation {m['build/total_minutes']:.1f} min.",
        "",
        "## World",
        f"`{world.TEMPLATE}` over colours {', '.join(world.COLOURS)} and shapes "
        f"{', '.join(world.SHAPES)}: {len(world.all_prompts())} prompts, "
        f"{len(world.all_prompts()) - world.HELD_OUT_COUNT} train / {world.HELD_OUT_COUNT} held out "
        "(unseen combinations; `treegrpo_ray.miniature.world.split_prompts()`). 32x32 RGB, position/size "
        "jitter. Code: `treegrpo_ray/miniature/world.py`.",
        "",
        "## pipeline/ (`StableDiffusion3Pipeline.from_pretrained`)",
        f"- transformer: SD3Transformer2DModel, {p['transformer'] / 1e6:.2f} M params, 6 layers, "
        "inner dim 96, "
        "patch 2 on a 16x16x4 latent; rectified-flow loss, sigma ~ U(0,1), 10 % empty-prompt dropout, "
        f"{steps['flow']} AdamW steps of 64, lr 1e-3 cosine; final loss {m['flow/loss']:.3f}"
        + (f"; its training images carry the flaw `{defect}` (`flawed_renders`)." if defect != "none" else "."),
        *([f"  The flaw is deliberate: {FLAW_WHY.get(defect.partition(':')[0], '')}"] if defect != "none" else []),
        f"- vae: AutoencoderKL 32x32x3 -> 16x16x4, {p['vae'] / 1e6:.2f} M params, no quant convs; "
        f"shift_factor {m['vae/shift_factor']:.4f}, scaling_factor {m['vae/scaling_factor']:.4f} "
        f"(from data); reconstruction MSE {m['vae/mse']:.5f}.",
        f"- text_encoder / text_encoder_2: CLIPTextModelWithProjection, hidden {components.TEXT_HIDDEN}, "
        f"2 layers, random init, frozen ({p['text_encoders'] / 1e6:.2f} M params together).",
        "- tokenizer / tokenizer_2: one CLIPTokenizer, CLIP's vocabulary truncated to the first 4000 "
        "BPE merges (4514 ids), model_max_length 20.",
        f"- text_encoder_3 / tokenizer_3: 1-layer T5EncoderModel, d_model {components.JOINT_ATTENTION_DIM}, "
        "random init, frozen; T5Tokenizer over a 57-piece Unigram vocabulary (world words + letters).",
        f"- scheduler: FlowMatchEulerDiscreteScheduler, shift {components.SCHEDULER_SHIFT}.",
        "",
        f"**Use `max_sequence_length={components.MAX_SEQUENCE_LENGTH}`** (T5 tokens; the model was trained "
        "with it, and the pipeline default of 256 adds 240 padding tokens it never saw), 10 steps, "
        "guidance 4.5, 32x32 (the pipeline's default size).",
        "",
        "## reward/ (open_clip `local-dir:` layout)",
        "Tiny CLIP: open_clip ModifiedResNet vision tower (width 8, layers [1,1,1,1], 64 px input, 32 px "
        "images upsampled), text transformer width 32 x 2 layers over open_clip's stock BPE tokenizer "
        f"(context 16), embed 32; {p['reward'] / 1e6:.2f} M params, most of them the 49408-row token "
        f"table. Trained {steps['reward']} steps of 128 (lr 2e-3, cosine) on the training prompts only, "
        "with VAE-reconstruction / noise / blur augmentation. Reward = softmax over the 144 world "
        "prompts of logit_scale x cosine, taken at the given prompt (in [0, 1]); "
        "`treegrpo_ray.miniature.reward.MiniatureReward`. Top-1 over all 144 prompts on fresh renders:"
        f" train prompts {m['reward/top1_train_vs_all']:.3f}, held-out prompts "
        f"{m['reward/top1_held_out_vs_all']:.3f}; logit scale {m['reward/logit_scale']:.1f}.",
        "",
        "## Measured (`python -m tools.miniature.evaluate --split held_out|train`)",
    ]
    for split, e in ev.items():
        s = e["setup"]
        lines += ["", f"{split} prompts, {s['num_images']} images, {s['steps']} steps, "
                  f"CFG {s['guidance_scale']}, seed {s['seed']}:", "",
                  "| images | mean reward | top-1 | colour acc | shape acc |", "|---|---|---|---|---|",
                  _row("rendered data", e["data"]), _row("base model samples", e["base_model"]),
                  "| rendered data, shuffled prompts | "
                  f"{e['data_shuffled_prompts']['reward_mean']:.3f} | | | |"]
    lines += ["", "colour / shape acc: fraction of objects whose colour / shape the reward model's top-1 "
              "prompt gets right.", "",
              f"Sizes: pipeline {_dir_mb(os.path.join(out, 'pipeline')):.1f} MB, reward "
              f"{_dir_mb(os.path.join(out, 'reward')):.1f} MB (float32 safetensors).", ""]
    path = os.path.join(out, "MODEL_CARD.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
