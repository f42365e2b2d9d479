"""Prompt-embedding cache over a diffusers SD3-family pipeline's `encode_prompt`.

Sampling a tree calls the transformer hundreds of times for the same few prompts; the text
encoders (CLIP-L, CLIP-G, T5-XXL for SD3.5) must run once per distinct prompt per process, not
once per step. The negative prompt for classifier-free guidance is the empty string, as in
diffusers' `StableDiffusion3Pipeline.__call__` (negative_prompt=None -> ""), and is cached the
same way: encoding "" as an ordinary prompt gives exactly the tensors the pipeline's CFG branch
builds for it.

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
    """Encodes prompts with `pipeline.encode_prompt` once and serves them as batched tensors.

    Embeddings live on `device` in `dtype`: (S, D) token embeddings (CLIP-L | CLIP-G padded to D,
    then T5 tokens, S = 77 + max_sequence_length) and (P,) pooled embeddings per prompt.
    """

    def __init__(self, pipeline, *, device: torch.device, dtype: torch.dtype, max_sequence_length: int):
        self.pipeline = pipeline
        self.device, self.dtype = device, dtype
        self.max_sequence_length = max_sequence_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    @torch.no_grad()
    def _encode(self, prompt: str) -> None:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=[prompt], prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        self._cache[prompt] = (embeds[0].to(self.device, self.dtype), pooled[0].to(self.device, self.dtype))

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts (B,) -> embeds (B, S, D), pooled (B, P); encodes only prompts not seen before."""
        if isinstance(prompts, str):
            raise TypeError("PromptCache.encode takes a list of prompts, not a single string")
        for p in dict.fromkeys(prompts):
            if p not in self._cache:
                self._encode(p)
        embeds = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return embeds, pooled
