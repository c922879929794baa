"""Class token spans and class chunking with the real CLIP BPE tokenizer."""
from __future__ import annotations

import pytest
import torch

from ovss.text.clip_bpe import BOS_ID, EOS_ID, clip_tokenizer
from ovss.text.spans import chunk_classes, class_token_spans

COMMA = 267


@pytest.fixture(scope="module")
def tok():
    return clip_tokenizer()


def _whole(tok, text: str) -> list[int]:
    ids = tok(text, padding="max_length", max_length=77)["input_ids"]
    assert len(ids) == 77
    return ids


def test_faseg_example(tok):
    ids, spans = class_token_spans(tok, ["tv monitor", "dog", "person"])
    assert ids[:8] == [49406, 1583, 10198, 267, 1929, 267, 2533, 49407]
    assert ids[8:] == [tok.pad_token_id] * 69 and len(ids) == 77
    assert spans == [[1, 2], [4], [6]]
    assert ids == _whole(tok, "tv monitor, dog, person")


@pytest.mark.parametrize("name, n_tokens", [("aeroplane", 2), ("fire hydrant", 3), ("surfboard", 2), ("cat", 1)])
def test_multi_token_names_keep_all_sub_tokens(tok, name, n_tokens):
    ids, spans = class_token_spans(tok, ["dog", name])
    assert spans[1] == list(range(3, 3 + n_tokens))
    assert [ids[p] for p in spans[1]] == tok(name, add_special_tokens=False)["input_ids"]
    if name == "aeroplane":
        assert [ids[p] for p in spans[1]] == [27735, 3980]


def test_prefix_shifts_spans_and_matches_whole_string(tok):
    names = ["tv monitor", "dog", "person"]
    prefix = "a cat on a mat ; "
    ids, spans = class_token_spans(tok, names, prefix=prefix)
    n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
    assert spans == [[1 + n_prefix, 2 + n_prefix], [4 + n_prefix], [6 + n_prefix]]
    assert ids == _whole(tok, prefix + ", ".join(names))


VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
       "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]


COLLIDING = ["hot dog", "dog", "teddy bear", "bear", "bedclothes", "bed"]


@pytest.mark.parametrize("names, sep", [(VOC, ", "), (COLLIDING, ", "), (["computer", "fire hydrant"], " and ")])
def test_pieces_equal_whole_string_and_spans_are_clean(tok, names, sep):
    ids, spans = class_token_spans(tok, names, sep)
    assert ids == _whole(tok, sep.join(names))
    assert len(spans) == len(names)
    sep_ids = set(tok(sep, add_special_tokens=False)["input_ids"])
    flat = [p for span in spans for p in span]
    assert len(flat) == len(set(flat))
    n_content = ids.index(EOS_ID) - 1
    for name, span in zip(names, spans):
        assert span and all(1 <= p <= n_content for p in span)
        assert span == list(range(span[0], span[-1] + 1))
        assert [ids[p] for p in span] == tok(name, add_special_tokens=False)["input_ids"]
        assert not {ids[p] for p in span} & ({BOS_ID, EOS_ID, tok.pad_token_id} | sep_ids)
    uncovered = [ids[p] for p in range(1, n_content + 1) if p not in flat]
    assert set(uncovered) <= sep_ids and len(uncovered) == len(names) - 1


def test_overflow_names_the_classes_that_do_not_fit(tok):
    names = [f"class{i}" for i in range(40)]
    with pytest.raises(ValueError) as err:
        class_token_spans(tok, names)
    last, fitting = 0, []  # position of each name's last token: BOS, earlier names and one comma each
    for name in names:
        last += (1 if last else 0) + len(tok(name, add_special_tokens=False)["input_ids"])
        if last >= 76:  # position 76 is the last one, reserved for EOS
            break
        fitting.append(name)
    message = str(err.value)
    assert 0 < len(fitting) < len(names)
    assert all(f"'{n}'" not in message for n in fitting)
    assert all(f"'{n}'" in message for n in names[len(fitting):])
    ids, spans = class_token_spans(tok, names[: len(fitting)])
    assert spans[-1][-1] <= 75 and ids.count(EOS_ID) >= 1


def test_overflow_boundary_is_the_eos_slot(tok):
    ids, spans = class_token_spans(tok, ["cat"] * 37 + ["dog"])  # 75 content tokens: EOS lands on position 76
    assert spans[-1] == [75] and ids[76] == EOS_ID and len(ids) == 77
    assert ids == _whole(tok, ", ".join(["cat"] * 37 + ["dog"]))
    with pytest.raises(ValueError, match="aeroplane"):  # 76 content tokens: "lane" would take the EOS slot
        class_token_spans(tok, ["cat"] * 37 + ["aeroplane"])
    with pytest.raises(ValueError, match="prefix"):
        class_token_spans(tok, [], prefix="cat " * 76)


def test_names_without_tokens_are_refused(tok):
    with pytest.raises(ValueError, match="no tokens"):
        class_token_spans(tok, ["cat", "   "])


def test_chunk_classes_groups_fit_and_are_consecutive(tok):
    names = VOC * 3
    groups = chunk_classes(tok, names, max_tokens=75)
    assert [i for g in groups for i in g] == list(range(len(names)))
    for g in groups:
        n = len(tok(", ".join(names[i] for i in g), add_special_tokens=False)["input_ids"])
        assert n <= 75
        class_token_spans(tok, [names[i] for i in g])
    for a, b in zip(groups, groups[1:]):  # greedy: the next class would not have fitted
        n = len(tok(", ".join(names[i] for i in a + b[:1]), add_special_tokens=False)["input_ids"])
        assert n > 75
    assert chunk_classes(tok, ["cat", "dog"], max_tokens=75) == [[0, 1]]
    assert chunk_classes(tok, ["cat", "dog"], max_tokens=2) == [[0], [1]]
    with pytest.raises(ValueError, match="fire hydrant"):
        chunk_classes(tok, ["cat", "fire hydrant"], max_tokens=2)


def test_tokenize_prompts_pads_truncates_and_warns_once_per_cut_prompt(caplog):
    from ovss.diffusion.text import tokenize_prompts

    tok = clip_tokenizer()
    prompts = ["a cat", "a very long caption " * 30, "x " * 75, "x " * 76]
    ids = tokenize_prompts(tok, prompts)
    ref = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (4, 77) and torch.equal(ids, ref)
    cut = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert len(cut) == 2 and "very long" in cut[0] and "x x" in cut[1]
