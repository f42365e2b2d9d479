"""What a run leaves to look at in its run folder, beside what the MLflow run holds:

* `reward_curve.png`: training reward (tree leaves), eval reward (training prompts, ODE) and
  held-out reward (prompts it never trains on) against iteration and against training seconds;
* `samples.png`: the eval grid of the base model (iteration 0) over the trained one (the last),
  same prompts and noise; the grids themselves are kept as `samples/iter_<step>.png` (video: a
  frames grid, one row per clip, and the first clips as `samples/iter_<step>_clip<i>.gif`).

Both are rebuilt at the end from the MLflow run's whole metric history and the saved grids, so a
resumed run's figures cover the whole run. Used by the driver only.
"""
from __future__ import annotations

import io

import numpy as np
import torch

from treegrpo_ray import storage

CURVES = (("reward/combined", "train (tree leaves)"), ("eval/reward", "eval: training prompts"),
          ("eval_held_out/reward", "eval: held-out prompts"))
TIME_KEY = "time/iter_s"


def grid_location(run_dir: str, step: int) -> str:
    return storage.join(run_dir, "samples", f"iter_{step:06d}.png")


def png(array: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


EVAL_CLIPS = 4     # clips of a video run's eval written as GIFs
CLIP_FPS = 16      # Wan2.1's frame rate


def gif(clip: torch.Tensor, fps: int = CLIP_FPS) -> bytes:
    """One clip (T, 3, H, W) in [0, 1] -> an animated GIF (PIL: always installed, unlike an MP4 encoder)."""
    from PIL import Image
    frames = (clip.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, 3)
    pics = [Image.fromarray(f) for f in frames]
    buf = io.BytesIO()
    pics[0].save(buf, format="GIF", save_all=True, append_images=pics[1:], duration=round(1000 / fps), loop=0)
    return buf.getvalue()


def save_clips(run_dir: str, step: int, clips: torch.Tensor, count: int = EVAL_CLIPS) -> list[str]:
    """A video run's first `count` eval clips (B, T, 3, H, W) -> samples/iter_<step>_clip<i>.gif;
    returns their locations (the frames grid is `save_grid`'s, as for images)."""
    locations = []
    for i, clip in enumerate(clips[:count]):
        location = storage.join(run_dir, "samples", f"iter_{step:06d}_clip{i}.gif")
        storage.write_bytes(location, gif(clip))
        locations.append(location)
    return locations


def save_grid(run_dir: str, step: int, images: torch.Tensor) -> str:
    """Eval images (B, 3, H, W) in [0, 1] -> samples/iter_<step>.png; returns its location. Video
    clips (B, T, 3, H, W) give a frames grid (one row per clip)."""
    from treegrpo_ray.tracking import make_grid
    location = grid_location(run_dir, step)
    storage.write_bytes(location, png(make_grid(images)))
    return location


def series(history: dict[str, list[tuple[int, float]]],
           curves=CURVES) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """{metric: (steps, training seconds at each step, values)} for the CURVES present. Training
    seconds at step s = sum of time/iter_s over steps 1..s (step 0, before training, is 0 s)."""
    per_step = dict(history.get(TIME_KEY, []))
    elapsed, total = {0: 0.0}, 0.0
    for step in sorted(per_step):
        total += per_step[step]
        elapsed[step] = total
    out = {}
    for key, _ in curves:
        points = sorted(history.get(key, []))
        if points:
            steps = [s for s, _ in points]
            out[key] = (steps, [elapsed.get(s, float("nan")) for s in steps], [v for _, v in points])
    return out


def curve_png(history: dict[str, list[tuple[int, float]]], title: str = "", curves=CURVES) -> bytes:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(history, curves)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for key, label in curves:
        if key in data:
            steps, seconds, values = data[key]
            style = dict(marker="o" if len(steps) < 40 else None, markersize=3, label=label)
            axes[0].plot(steps, values, **style)
            axes[1].plot(seconds, values, **style)
    axes[0].set_xlabel("iteration")
    axes[1].set_xlabel("training seconds (sum of iteration times)")
    axes[0].set_ylabel("reward")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def comparison_png(before: bytes, after: bytes, labels: tuple[str, str]) -> bytes:
    """Two grid PNGs, one above the other, each titled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    grids = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in (before, after)]
    h, w = grids[0].shape[:2]
    scale = max(1.0, 640 / w)  # tiny miniature images: enlarge, pixels kept sharp
    fig, axes = plt.subplots(2, 1, figsize=(w * scale / 100, 2 * h * scale / 100 + 0.8))
    for ax, grid, label in zip(axes, grids, labels):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write(run_dir: str, history: dict[str, list[tuple[int, float]]], last_step: int, title: str = "",
          curves=CURVES) -> list[str]:
    """Write reward_curve.png (`curves`: (metric, label) pairs) and (if both grids exist) samples.png
    into run_dir; returns their locations."""
    written = []
    if any(history.get(k) for k, _ in curves):
        location = storage.join(run_dir, "reward_curve.png")
        storage.write_bytes(location, curve_png(history, title, curves))
        written.append(location)
    first, last = grid_location(run_dir, 0), grid_location(run_dir, last_step)
    if last_step > 0 and storage.exists(first) and storage.exists(last):
        location = storage.join(run_dir, "samples.png")
        storage.write_bytes(location, comparison_png(
            storage.read_bytes(first), storage.read_bytes(last),
            ("iteration 0 (base model)", f"iteration {last_step} (trained); same prompts and noise")))
        written.append(location)
    return written
