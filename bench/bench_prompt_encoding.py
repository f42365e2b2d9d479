"""What encoding each prompt on its own costs (issue 17): `PromptCache` now calls the pipeline's
`encode_prompt` once per distinct prompt, a batch of one, so that an embedding does not depend on
which other prompts were missing from the cache at the time. Baseline, in the same process: the
old way, all missing prompts in one `encode_prompt` call. Both on the shipped miniature pipeline
(CLIP-L/G-shaped text encoders, no T5) and on this machine's CPU threads; prints the ratio and
whether the two give the same bits.

    PYTHONPATH=. python bench/bench_prompt_encoding.py [--prompts 64] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from treegrpo_ray.builders import MINIATURE_DIR
from treegrpo_ray.models.policy import DiffusionPolicy
from treegrpo_ray.miniature.world import split_prompts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    policy = DiffusionPolicy.from_pretrained(str(MINIATURE_DIR / "pipeline"), max_sequence_length=16)
    prompts = split_prompts()[0][:args.prompts]
    pipe, seq = policy.pipeline, policy.prompts.max_sequence_length

    def batched():
        with torch.no_grad():
            return pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device="cpu",
                                      num_images_per_prompt=1, do_classifier_free_guidance=False,
                                      max_sequence_length=seq)

    def one_by_one():
        policy.prompts._cache.clear()
        return policy.prompts.encode(prompts)

    times = {"batched": [], "one_by_one": []}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "batched":
                b_emb = out[0]
            else:
                o_emb = out[0]
    med = {k: statistics.median(v) for k, v in times.items()}
    diff = float((b_emb - o_emb).abs().max())
    print(f"{len(prompts)} prompts, {args.threads} thread(s), median of {args.repeats}: batched {med['batched'] * 1e3:.1f} ms, "
          f"one by one {med['one_by_one'] * 1e3:.1f} ms, ratio {med['one_by_one'] / med['batched']:.2f}x; "
          f"max |batched - one by one| = {diff:.2e}")


if __name__ == "__main__":
    main()
