"""The miniature world: a closed, synthetic text-to-image domain of coloured shapes.

Every prompt follows one template, "a {colour} {shape} on the left and a {colour} {shape} on
the right", over 4 colours x 3 shapes per side = 144 prompts. Images are 32x32 RGB on a dark
background: one object in the left half, one in the right half. The renderer is deterministic
given a `torch.Generator` (which only jitters size and position); without one it draws the
canonical scene. Shapes are drawn 4x supersampled and average-pooled, so edges are anti-aliased.

This is the project's stand-in for the paper's real prompts and images (DESIGN.md §3): small
enough that a ~2M-parameter SD3 model learns it on a CPU in minutes, compositional enough that
it gets it only partly right, which leaves room for an RL reward to help.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RESOLUTION = 32
SUPERSAMPLE = 4
BACKGROUND = (0.12, 0.12, 0.12)
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TEMPLATE = "a {lc} {ls} on the left and a {rc} {rs} on the right"
HELD_OUT_COUNT = 24   # 144 prompts -> 120 train / 24 held out
SPLIT_SEED = 0

# Jitter ranges (pixels, at 32x32): object centre and radius.
CENTRE_X = {"left": 8.0, "right": 24.0}
CENTRE_Y = 16.0
JITTER_XY = 2.0
RADIUS = 6.0
JITTER_RADIUS = 1.0


@dataclass(frozen=True)
class ObjectSpec:
    colour: str
    shape: str


@dataclass(frozen=True)
class SceneSpec:
    left: ObjectSpec
    right: ObjectSpec

    @property
    def prompt(self) -> str:
        return TEMPLATE.format(lc=self.left.colour, ls=self.left.shape,
                               rc=self.right.colour, rs=self.right.shape)


def all_scenes() -> list[SceneSpec]:
    """All 144 scenes in a fixed order (left colour, left shape, right colour, right shape)."""
    objects = [ObjectSpec(c, s) for c, s in itertools.product(COLOURS, SHAPES)]
    return [SceneSpec(left, right) for left, right in itertools.product(objects, objects)]


def all_prompts() -> list[str]:
    return [scene.prompt for scene in all_scenes()]


def parse_prompt(prompt: str) -> SceneSpec:
    """Inverse of `SceneSpec.prompt`; raises ValueError for a prompt outside the world."""
    words = prompt.strip().split()
    expected = TEMPLATE.split()
    if len(words) != len(expected):
        raise ValueError(f"not a miniature-world prompt: {prompt!r}")
    slots = {}
    for word, pattern in zip(words, expected):
        if pattern.startswith("{"):
            slots[pattern.strip("{}")] = word
        elif word != pattern:
            raise ValueError(f"not a miniature-world prompt: {prompt!r}")
    for key in ("lc", "rc"):
        if slots[key] not in COLOURS:
            raise ValueError(f"unknown colour {slots[key]!r} in {prompt!r}")
    for key in ("ls", "rs"):
        if slots[key] not in SHAPES:
            raise ValueError(f"unknown shape {slots[key]!r} in {prompt!r}")
    return SceneSpec(ObjectSpec(slots["lc"], slots["ls"]), ObjectSpec(slots["rc"], slots["rs"]))


DEMO_COUNT = 16


def demo_prompts(count: int = DEMO_COUNT) -> list[str]:
    """The embedded default's training prompts: a fixed random subset (seed 0, independent of a
    run's seed) of the training split. RL on a CPU sees each of 16 prompts every few iterations,
    so the reward it gains shows in minutes; over all 120 the same compute spreads too thin
    (README, 'Status')."""
    train, _ = split_prompts()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    return [train[i] for i in order[:count]]


def split_prompts(seed: int = SPLIT_SEED, held_out: int = HELD_OUT_COUNT) -> tuple[list[str], list[str]]:
    """Deterministic (train, held_out) split of `all_prompts()`.

    Held-out prompts are unseen *combinations*: every (colour, shape) still appears on each side
    in the training prompts, which the function checks.
    """
    prompts = all_prompts()
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(order[:held_out])
    train = [p for i, p in enumerate(prompts) if i not in set(held)]
    seen_left = {(s.left.colour, s.left.shape) for s in map(parse_prompt, train)}
    seen_right = {(s.right.colour, s.right.shape) for s in map(parse_prompt, train)}
    assert len(seen_left) == len(seen_right) == len(COLOURS) * len(SHAPES), "split hides an object"
    return train, [prompts[i] for i in held]


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> torch.Tensor:
    """Boolean (size, size) mask of one shape; coordinates in units of the mask's pixels."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")  # (size, size) each
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        half = 0.85 * r  # area 2.9 r^2 vs circle 3.1 r^2: similar ink, different outline
        return (dx.abs() <= half) & (dy.abs() <= half)
    if shape == "triangle":
        # upward isosceles triangle: apex (0, -r), base from (-r, 0.8r) to (r, 0.8r)
        top, bottom = -r, 0.8 * r
        inside_y = (dy >= top) & (dy <= bottom)
        half_width = r * (dy - top) / (bottom - top)
        return inside_y & (dx.abs() <= half_width)
    raise ValueError(f"unknown shape {shape!r}")


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    if generator is None:
        return 0.5 * (low + high)
    return low + (high - low) * torch.rand((), generator=generator).item()


def render(scene: SceneSpec | str, generator: torch.Generator | None = None, scale: float = 1.0) -> torch.Tensor:
    """Draw one scene. Returns (3, 32, 32) float32 in [0, 1].

    With `generator` the object centres move by up to ±2 px and radii by ±1 px (drawn in a fixed
    order, so the same generator state gives the same image); without it the scene is canonical.
    `scale` multiplies both radii (tools/miniature/build.py's `--flow-defect shrink:`).
    """
    if isinstance(scene, str):
        scene = parse_prompt(scene)
    size = RESOLUTION * SUPERSAMPLE
    canvas = torch.tensor(BACKGROUND, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).clone()
    for side, obj in (("left", scene.left), ("right", scene.right)):
        cx = _uniform(generator, CENTRE_X[side] - JITTER_XY, CENTRE_X[side] + JITTER_XY)
        cy = _uniform(generator, CENTRE_Y - JITTER_XY, CENTRE_Y + JITTER_XY)
        r = scale * _uniform(generator, RADIUS - JITTER_RADIUS, RADIUS + JITTER_RADIUS)
        mask = _shape_mask(obj.shape, cx * SUPERSAMPLE, cy * SUPERSAMPLE, r * SUPERSAMPLE, size)
        colour = torch.tensor(COLOURS[obj.colour], dtype=torch.float32).view(3, 1, 1)
        canvas = torch.where(mask, colour, canvas)  # (3, size, size)
    return F.avg_pool2d(canvas.unsqueeze(0), SUPERSAMPLE).squeeze(0)  # (3, 32, 32)


def render_batch(prompts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
    """Render prompts in order with one generator. Returns (B, 3, 32, 32)."""
    return torch.stack([render(p, generator) for p in prompts])


def world_spec() -> dict:
    """The JSON-able description shipped as reward/world.json."""
    train, held_out = split_prompts()
    return {
        "template": TEMPLATE,
        "resolution": RESOLUTION,
        "colours": {name: list(rgb) for name, rgb in COLOURS.items()},
        "shapes": list(SHAPES),
        "prompts": all_prompts(),
        "train_prompts": train,
        "held_out_prompts": held_out,
        "split_seed": SPLIT_SEED,
    }
