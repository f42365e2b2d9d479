"""JPEG compressibility golden values and the VAE latent decoder on a tiny AutoencoderKL."""
from __future__ import annotations

import pytest
import torch

from tests.rewards_fixtures import tiny_vae
from treegrpo_ray.rewards.decode import LatentDecoder
from treegrpo_ray.rewards.scorers import JpegCompressibility, JpegIncompressibility, jpeg_size_kb

torch.set_num_threads(1)

# Golden sizes (Pillow's bundled libjpeg-turbo, quality 95, default 4:2:0 chroma subsampling,
# standard Huffman tables). The fixed part of every file is 625 bytes:
#   SOI 2 + APP0/JFIF 18 + 2 DQT markers 2 * (4 + 65) = 138 + SOF0 19
#   + 4 DHT markers 4 * 4 + (17+12) + (17+162) + (17+12) + (17+162) = 432 + SOS 14 + EOI 2 = 625.
# Entropy data of a constant image: 4:2:0 makes 16x16 MCUs of 4 Y + 1 Cb + 1 Cr blocks. Gray 0.5
# rounds to 128, so after the -128 level shift every DC is 0: a Y block costs DC category 0 ("00",
# 2 bits) + EOB ("1010", 4 bits) = 6 bits, a chroma block 2 + 2 = 4 bits -> 4*6 + 2*4 = 32 bits
# = 4 bytes per MCU.
#   32x32 gray:  4 MCUs -> 16 bytes -> 641 bytes -> 0.641 kB
#   64x64 gray: 16 MCUs -> 64 bytes -> 689 bytes -> 0.689 kB
#   32x32 black: the first Y block's DC is (0 - 128) * 8 / q_dc(=2 at q95) = -512, category 10:
#                8-bit code + 10 extra bits = 18 bits instead of 2, +16 bits -> 643 bytes -> 0.643 kB
#   32x32 uniform noise (torch seed 0): measured once, 1821 bytes; 64x64: 5392 bytes.
GRAY32 = torch.full((1, 3, 32, 32), 0.5)
GRAY64 = torch.full((1, 3, 64, 64), 0.5)
BLACK32 = torch.zeros(1, 3, 32, 32)


def noise(size: int) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_jpeg_golden_sizes():
    images = torch.cat([GRAY32, BLACK32, noise(32)])
    torch.testing.assert_close(jpeg_size_kb(images), torch.tensor([0.641, 0.643, 1.821]))
    torch.testing.assert_close(jpeg_size_kb(torch.cat([GRAY64, noise(64)])), torch.tensor([0.689, 5.392]))


def test_jpeg_rewards_signs_and_ordering():
    images = torch.cat([GRAY32, noise(32), BLACK32])
    prompts = ["x"] * 3
    comp = JpegCompressibility()(images, prompts)
    incomp = JpegIncompressibility()(images, prompts)
    torch.testing.assert_close(comp, -incomp)
    torch.testing.assert_close(comp, torch.tensor([-0.641, -1.821, -0.643]))
    assert comp[0] > comp[2] > comp[1]                 # gray compresses best, noise worst
    # chunking (batch_size=2 -> chunks of 2 + 1) does not change per-image scores
    torch.testing.assert_close(JpegCompressibility(batch_size=2)(images, prompts), comp)


def test_nonfinite_pixels_score_nan_not_zero():
    images = torch.cat([GRAY32, GRAY32])
    images[1, 0, 3, 3] = float("nan")
    out = JpegCompressibility()(images, ["a", "b"])
    assert out[0] == pytest.approx(-0.641) and torch.isnan(out[1])


@pytest.mark.parametrize("shift", [0.1, None])
def test_decoder_matches_manual_decode(tmp_path, shift):
    vae = tiny_vae(scaling_factor=0.5, shift_factor=shift)
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    dec = LatentDecoder.from_pretrained(tmp_path / "pipe", batch_size=2)   # 5 latents -> chunks 2 + 2 + 1
    assert dec.scaling_factor == 0.5 and dec.shift_factor == (shift or 0.0)
    latents = torch.randn(5, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    images = dec.decode(latents)
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32   # 2 blocks: 8 -> 16 pixels
    assert images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        # z = latents / 0.5 + shift; [-1, 1] -> [0, 1]
        expected = (vae.decode(latents / 0.5 + (shift or 0.0)).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)


def test_decoder_accepts_a_bare_vae_dir_and_rejects_bad_input(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae_only")
    dec = LatentDecoder.from_pretrained(tmp_path / "vae_only")
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        dec.decode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="empty batch"):
        dec.decode(torch.zeros(0, 4, 8, 8))
    with pytest.raises(FileNotFoundError, match="could not load the VAE"):
        LatentDecoder.from_pretrained(tmp_path / "missing")
