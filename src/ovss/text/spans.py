"""Token positions of class names inside a joined class prompt ("tv monitor, dog, person").

Spans are built while joining, by tokenising every piece on its own: CLIP pre-tokenises at word and
punctuation boundaries, so the pieces concatenate to the tokenisation of the whole string, and each class
gets exactly its own sub-tokens. This avoids the official FA-Seg matcher's hard-coded spellings and its
collisions between names that share words (FA-Seg spec, traps 3 and 4).
"""
from __future__ import annotations


def _content_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _name_ids(tokenizer, names: list[str]) -> list[list[int]]:
    ids = [_content_ids(tokenizer, name) for name in names]
    empty = [name for name, piece in zip(names, ids) if not piece]
    if empty:
        raise ValueError(f"class name(s) {empty!r} produce no tokens")
    return ids


def class_token_spans(tokenizer, names: list[str], sep: str = ", ", *, prefix: str = "", max_length: int = 77
                      ) -> tuple[list[int], list[list[int]]]:
    """Ids of `prefix + sep.join(names)` with BOS/EOS, padded to `max_length`, and each name's token positions.

    Positions count BOS as 0; separators and the prefix are tokens too but belong to no span. Raises
    ValueError naming the classes whose tokens would be cut by the `max_length` limit (BOS + content + EOS).
    """
    sep_ids = _content_ids(tokenizer, sep)
    content = _content_ids(tokenizer, prefix) if prefix else []
    spans = []
    for i, piece in enumerate(_name_ids(tokenizer, names)):
        if i:
            content += sep_ids
        start = 1 + len(content)
        spans.append(list(range(start, start + len(piece))))
        content += piece
    overflow = [name for name, span in zip(names, spans) if span[-1] >= max_length - 1]
    if overflow:
        raise ValueError(f"class name(s) {overflow!r} do not fit in {max_length} tokens "
                         f"({len(content) + 2} needed); split the classes into chunks")
    if len(content) + 2 > max_length:
        raise ValueError(f"prefix {prefix!r} alone does not fit in {max_length} tokens")
    whole = _content_ids(tokenizer, prefix + sep.join(names))
    if whole != content:
        raise ValueError(f"tokenising the pieces of {prefix + sep.join(names)!r} separately differs from "
                         f"tokenising it whole; the separator or prefix must end at a word boundary")
    ids = [tokenizer.bos_token_id, *content, tokenizer.eos_token_id]
    return ids + [tokenizer.pad_token_id] * (max_length - len(ids)), spans


def chunk_classes(tokenizer, names: list[str], sep: str = ", ", max_tokens: int = 75) -> list[list[int]]:
    """Split class indices into consecutive groups whose `sep`-joined prompt has at most `max_tokens` tokens.

    FA-Seg's `max_class_tokens` extension: each group becomes one class-key set of the dual prompt.
    """
    sep_len = len(_content_ids(tokenizer, sep))
    groups: list[list[int]] = []
    used = 0
    for i, piece in enumerate(_name_ids(tokenizer, names)):
        if len(piece) > max_tokens:
            raise ValueError(f"class name {names[i]!r} alone needs {len(piece)} > {max_tokens} tokens")
        if groups and used + sep_len + len(piece) <= max_tokens:
            groups[-1].append(i)
            used += sep_len + len(piece)
        else:
            groups.append([i])
            used = len(piece)
    return groups
