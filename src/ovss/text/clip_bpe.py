"""The real CLIP BPE tokenizer, built offline from the shipped merge list.

Stable Diffusion's and CLIP's tokenizers share this 49,408-token vocabulary. Tiny/toy models use it so
that class names split into the same sub-tokens as with the real weights (aeroplane -> aerop + lane).
"""
from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407
N_MERGES = 49152 - 256 - 2  # the merges CLIP uses: 48,894


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table, in CLIP's order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) exactly as OpenAI CLIP builds them."""
    path = resources.files("ovss") / "assets" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    byte_chars = _bytes_to_unicode()
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@lru_cache(maxsize=4)
def clip_tokenizer(model_max_length: int = 77):
    """A transformers CLIPTokenizer identical to the SD-1.x / OpenAI CLIP one (pad = EOS = 49407).

    Cached (building takes ~1 s); treat the returned tokenizer as read-only.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    tok = CLIPTokenizer(
        vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length,
        bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>", pad_token="<|endoftext|>",
    )
    if len(tok) != VOCAB_SIZE:
        raise RuntimeError(f"CLIP BPE tokenizer has {len(tok)} tokens, expected {VOCAB_SIZE}")
    return tok
