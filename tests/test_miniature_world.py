"""The miniature world's renderer, prompt set, split and tokenizers (no trained assets needed)."""
import pytest
import torch

from treegrpo_ray.miniature import world
from tools.miniature.tokenizer import build_t5_tokenizer, build_tokenizer, clip_vocab_and_merges

RED = torch.tensor(world.COLOURS["red"])
BLUE = torch.tensor(world.COLOURS["blue"])
BG = torch.tensor(world.BACKGROUND)
PROMPT = "a red square on the left and a blue circle on the right"


def test_render_shape_range_and_determinism():
    a = world.render(PROMPT, torch.Generator().manual_seed(3))
    b = world.render(PROMPT, torch.Generator().manual_seed(3))
    c = world.render(PROMPT, torch.Generator().manual_seed(4))
    assert a.shape == (3, 32, 32) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # jitter moves/resizes the objects
    assert torch.equal(world.render(PROMPT), world.render(world.parse_prompt(PROMPT)))


def test_canonical_pixels():
    img = world.render(PROMPT)  # canonical: centres (8, 16) and (24, 16), radius 6
    assert torch.allclose(img[:, 16, 8], RED)    # left object centre
    assert torch.allclose(img[:, 16, 24], BLUE)  # right object centre
    assert torch.allclose(img[:, 0, 0], BG)      # corner
    assert torch.allclose(img[:, 16, 16], BG)    # gap between the objects
    # Pixel (row 20, col 12) spans offsets [4, 5] x [4, 5] from the left centre (8, 16).
    # Square half side 0.85 * 6 = 5.1 >= 5: fully inked. A circle of radius 6 misses the
    # corner (5, 5) (sqrt(50) = 7.07 > 6): partly inked, so not pure red.
    assert torch.allclose(img[:, 20, 12], RED)
    circle = world.render("a red circle on the left and a blue circle on the right")
    assert not torch.allclose(circle[:, 20, 12], RED, atol=0.05)


def test_shapes_differ_with_similar_ink():
    ink = {}
    for shape in world.SHAPES:
        img = world.render(f"a red {shape} on the left and a red {shape} on the right")
        ink[shape] = (img - BG.view(3, 1, 1)).abs().sum().item()
    # areas: circle pi*36 = 113.1 px; triangle base 12 x height 10.8 / 2 = 64.8 px; square of
    # half side 5.1 snaps to the 4x supersampling grid: centres +-0.5, ..., +-19.5 -> 40/4 = 10 px
    # wide, 100 px (the ratio 100 / 113.1 = 0.884, against 104 / 113.1 = 0.920 unsnapped)
    assert ink["square"] / ink["circle"] == pytest.approx(100.0 / 113.1, rel=0.02)
    assert ink["triangle"] / ink["circle"] == pytest.approx(64.8 / 113.1, rel=0.03)


def test_prompts_parse_round_trip_and_reject_strangers():
    prompts = world.all_prompts()
    assert len(prompts) == 144 == len(set(prompts))  # (4 colours * 3 shapes)^2
    for p in prompts:
        assert world.parse_prompt(p).prompt == p
    for bad in ("a red circle", "a pink circle on the left and a blue square on the right",
                "a red circle on the top and a blue square on the right"):
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_split_is_deterministic_disjoint_and_covers_every_object():
    train, held = world.split_prompts()
    assert (train, held) == world.split_prompts()
    assert len(train) == 120 and len(held) == 24
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(world.all_prompts())
    assert world.world_spec()["held_out_prompts"] == held


def test_render_batch_is_the_sequence_of_renders():
    prompts = world.all_prompts()[:3]
    batch = world.render_batch(prompts, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(batch, torch.stack([world.render(p, gen) for p in prompts]))


def test_clip_tokenizer_matches_clip_ids_and_round_trips():
    vocab, merges = clip_vocab_and_merges(4000)
    assert len(vocab) == 256 + 256 + 4000 + 2 and len(merges) == 4000
    tok = build_tokenizer()
    # real CLIP ids (open_clip SimpleTokenizer): "a</w>" 320, "red</w>" 736, "left</w>" 1823
    assert tok.convert_tokens_to_ids(["a</w>", "red</w>", "left</w>"]) == [320, 736, 1823]
    assert (tok.bos_token_id, tok.eos_token_id) == (4512, 4513)
    for p in world.all_prompts():
        ids = tok(p)["input_ids"]
        assert len(ids) <= tok.model_max_length == 20  # never truncated
        assert tok.decode(ids, skip_special_tokens=True) == p


def test_clip_tokenizer_save_load(tmp_path):
    from transformers import CLIPTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    loaded = CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded(PROMPT)["input_ids"] == build_tokenizer()(PROMPT)["input_ids"]
    assert loaded.model_max_length == 20


def test_t5_tokenizer_whole_words():
    words = sorted({w for p in world.all_prompts() for w in p.split()})
    tok = build_t5_tokenizer(words)
    ids = tok(PROMPT)["input_ids"]
    assert len(ids) == 13 + 1 and ids[-1] == tok.eos_token_id  # one piece per word + </s>
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    assert tok.unk_token_id not in tok("a purple hexagon")["input_ids"]  # letter fallback


def test_demo_prompts_are_a_fixed_subset_of_the_training_split():
    train, held = world.split_prompts()
    demo = world.demo_prompts()
    assert len(demo) == len(set(demo)) == world.DEMO_COUNT
    assert set(demo) <= set(train) and not set(demo) & set(held)
    assert world.demo_prompts() == demo  # independent of any global RNG state


def test_flawed_renders_by_hand():
    """build.py's --flow-defect flaws, checked against the world's own renders."""
    from tools.miniature.build import check_defect, flawed_renders

    prompts = world.all_prompts()[:2]
    index = torch.tensor([0, 1, 1])

    def renders(scenes, scale=1.0):  # one generator, in order, as render_pool draws them
        gen = torch.Generator().manual_seed(5)
        return torch.stack([world.render(s, gen, scale) for s in scenes])

    scenes = [world.parse_prompt(prompts[i]) for i in index.tolist()]
    clean = renders(scenes)
    draw = torch.rand(3, generator=torch.Generator().manual_seed(12)).tolist()  # the flaws' draws: seed + 7
    # swap:0.3 mirrors exactly the images whose draw is below 0.3 (row 1 of 3), with the same jitter
    mirrored = [world.SceneSpec(s.right, s.left) if d < 0.3 else s for s, d in zip(scenes, draw)]
    assert [m != s for m, s in zip(mirrored, scenes)] == [False, True, False]
    assert torch.equal(flawed_renders(prompts, index, "swap:0.3", seed=5), renders(mirrored))
    # fade:0.5: background + f (image - background), f = 0.5 + 0.5 draw
    bg = BG.view(1, 3, 1, 1)
    f = (0.5 + 0.5 * torch.tensor(draw)).view(3, 1, 1, 1)
    torch.testing.assert_close(flawed_renders(prompts, index, "fade:0.5", seed=5), bg + f * (clean - bg))
    # shrink:0.5 draws less ink than the clean render
    ink = (flawed_renders(prompts, index, "shrink:0.5", seed=5) - bg).abs().amax(1).sum((1, 2))
    assert (ink < (clean - bg).abs().amax(1).sum((1, 2))).all()
    # recolour:0.3 draws the yellow objects of row 1 (draw below 0.3) green, nothing else
    yellow = [p for p in world.all_prompts() if p.split()[1] == "yellow" and p.split()[8] != "yellow"][:2]
    scenes = [world.parse_prompt(yellow[i]) for i in index.tolist()]
    green = [world.SceneSpec(world.ObjectSpec("green", s.left.shape), s.right) for s in scenes]
    expected = renders([green[i] if i == 1 else s for i, s in enumerate(scenes)])
    recoloured = flawed_renders(yellow, index, "recolour:0.3", seed=5)
    assert torch.equal(recoloured, expected) and not torch.equal(recoloured, renders(scenes))
    check_defect("none")
    check_defect("recolour:0.9")
    for bad in ("swap:0.5", "fade:1", "blur:0.3", "shrink", "recolour:1"):
        with pytest.raises(ValueError, match="--flow-defect"):
            check_defect(bad)
