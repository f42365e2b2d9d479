"""Prompt-embedding cache over a model family's prompt encoder (the pipeline's `encode_prompt`).

Sampling a tree calls the transformer hundreds of times for the same few prompts; the text
encoders (CLIP-L, CLIP-G, T5-XXL for SD3.5) must run once per distinct prompt per process, not
once per step. The negative prompt for classifier-free guidance is the family's: the empty string,
as in diffusers' `StableDiffusion3Pipeline.__call__` (negative_prompt=None -> ""), or Qwen-Image's
" "; it is cached the same way: encoding it as an ordinary prompt gives exactly the tensors the
pipeline's CFG branch builds for it.

Each prompt is encoded on its own (a batch of one), never together with whatever else happened to
be missing from the cache: a CPU or GPU matmul's result for one row depends on the batch it is in
(blocking and reduction order change with the shape), so batching cache misses made a prompt's
embedding a function of the process's history. A sampler restarted by Ray re-encoded its prompts in
a different composition than in its first life, moved them by ~1e-7, and the run diverged from the
uninterrupted one through Adam (issue 17). A batch of one makes the embedding a function of the
prompt, the weights and the thread count only. The cost is a few more text-encoder calls, once per
distinct prompt per process.
"""
from __future__ import annotations

import torch


class PromptCache:
    """Encodes each prompt once with the family's `encode` (a batch of one, see above) and serves
    batches: `encode(prompts)` returns the family's conditioning tensors stacked over prompts, e.g.
    SD3: (B, S, D) token and (B, P) pooled embeddings; FLUX: T5 tokens and CLIP pooled; SD1.5: (B, 77, D);
    Qwen-Image: (B, L, D) embeddings zero-padded to L = max_sequence_length and their (B, L) masks.
    Tensors live on `device` in `dtype`."""

    def __init__(self, encode_one, *, device: torch.device, dtype: torch.dtype):
        self.encode_one = encode_one
        self.device, self.dtype = device, dtype
        self._cache: dict[str, tuple[torch.Tensor, ...]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """prompts (B,) -> the conditioning tensors, each (B, ...); encodes only prompts not seen before."""
        if isinstance(prompts, str):
            raise TypeError("PromptCache.encode takes a list of prompts, not a single string")
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                with torch.no_grad():
                    self._cache[p] = tuple(t.to(self.device, self.dtype) for t in self.encode_one(p))
        parts = zip(*(self._cache[p] for p in prompts))
        return tuple(torch.stack(part) for part in parts)
