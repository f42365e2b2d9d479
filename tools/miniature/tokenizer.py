"""An offline CLIP BPE tokenizer with a truncated vocabulary, for the miniature pipeline.

CLIP's vocabulary (Radford et al. 2021; open_clip `tokenizer.py`) is: the 256 byte-level
characters, the same 256 with the end-of-word marker '</w>', one token per BPE merge (in merge
order), then '<|startoftext|>' and '<|endoftext|>'. We rebuild exactly that from the merges file
open_clip ships (`bpe_simple_vocab_16e6.txt.gz`), but keep only the first `num_merges` merges.
Since merges are ordered by frequency, common words (all the miniature world's words) are still
whole tokens, and the text encoders' embedding tables stay small (4,514 rows instead of 49,408).

Departure from upstream: the vocabulary is truncated, so ids above 4,514 differ from real CLIP
ids; a word outside the kept merges splits into more pieces. Nothing is downloaded.

The T5 slot gets a `transformers.T5Tokenizer` over a tiny Unigram vocabulary (SentencePiece's
model, Kudo 2018): the special tokens, the world's words as whole pieces ("▁red") and single
letters as a fallback, so any lower-case text still tokenizes.
"""
from __future__ import annotations

import gzip
import os

from transformers import CLIPTokenizer, T5Tokenizer

DEFAULT_NUM_MERGES = 4000
DEFAULT_MAX_LENGTH = 20
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe_merges_path() -> str:
    import open_clip  # the merges file ships inside the open_clip package

    return os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP reversible map from the 256 bytes to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clip_vocab_and_merges(num_merges: int = DEFAULT_NUM_MERGES
                          ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The first `num_merges` CLIP merges and the vocabulary they imply (CLIP's id order)."""
    with gzip.open(_bpe_merges_path(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is a version header; CLIP uses lines[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_tokenizer(num_merges: int = DEFAULT_NUM_MERGES,
                    max_length: int = DEFAULT_MAX_LENGTH) -> CLIPTokenizer:
    """A real `transformers.CLIPTokenizer` over the truncated vocabulary (pad = end-of-text)."""
    vocab, merges = clip_vocab_and_merges(num_merges)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def save_tokenizer(out_dir: str, num_merges: int = DEFAULT_NUM_MERGES,
                   max_length: int = DEFAULT_MAX_LENGTH) -> CLIPTokenizer:
    tokenizer = build_tokenizer(num_merges, max_length)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


T5_MAX_LENGTH = 16  # world prompts are 13 words + </s>


def build_t5_tokenizer(words: list[str], max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """A real `T5Tokenizer` (Unigram) whose pieces are `words` plus letters/digits as fallback."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,'-"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)
