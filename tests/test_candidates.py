"""Candidate classes: caption nouns, the CLIP filter rule, BLIP captioning and the named selectors.

Tiny random models only: a BlipForConditionalGeneration (width 32, 2 layers) with a BertTokenizer over a
vocabulary written here, and a CLIPModel shaped as tagclip.md §6 (12 blocks) with the real CLIP BPE.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import ovss.candidates.clip_filter as cf
from ovss.candidates import (caption_images, clip_image_class_scores, get_selector, list_selectors,
                             names_in_caption, relative_keep, tag_many)
from ovss.candidates.clip_filter import clip_filter
from ovss.models.tiny import build_tiny

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "photo", "photograph", "of", "cat", "dog",
         "sitting", "on", "the", "couch", "table", "dining", "with", "and", "person", "car", "two"]


def _image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def blip():
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, bos_token="[DEC]")
    processor = BlipProcessor(image_processor=BlipImageProcessorPil(size={"height": 64, "width": 64}),
                              tokenizer=tok)
    std = 0.2  # large enough that different images give different captions
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
                         bos_token_id=vocab["[DEC]"], sep_token_id=vocab["[SEP]"], eos_token_id=vocab["[SEP]"],
                         pad_token_id=vocab["[PAD]"], initializer_range=std),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=64, patch_size=16, initializer_range=std),
        projection_dim=32, initializer_range=std)
    torch.manual_seed(0)
    return SimpleNamespace(model=BlipForConditionalGeneration(cfg).eval(), processor=processor, source="tiny")


@pytest.fixture(scope="module")
def clip():
    return build_tiny("clip")


@pytest.fixture(scope="module")
def images():
    return [_image(60 + 10 * i, 80, seed=i) for i in range(4)]


# -- nouns -----------------------------------------------------------------------------------------------

def test_nouns_multiword_longest_match_and_order():
    vocab = ["person", "table", "dining table", "cat", "dog"]
    assert names_in_caption("a dog and a cat at a dining table", vocab) == ["dining table", "cat", "dog"]
    assert names_in_caption("a dining table next to a table", vocab) == ["table", "dining table"]
    assert names_in_caption("Dining  Table", vocab) == ["dining table"]
    assert names_in_caption("a dining-table", vocab) == ["dining table"]


def test_nouns_plurals_and_word_boundaries():
    vocab = ["cat", "bus", "pony", "box", "monkey", "car"]
    assert names_in_caption("two cats, three buses, ponies, boxes and monkeys", vocab) == \
        ["cat", "bus", "pony", "box", "monkey"]
    assert names_in_caption("a category of scattered cards in a carton", vocab) == []
    assert names_in_caption("CAT", vocab) == ["cat"]
    assert names_in_caption("", vocab) == [] and names_in_caption("a cat", []) == []


def test_nouns_synonyms():
    vocab = ["person", "tv monitor", "sofa"]
    syn = {"person": ["people", "man", "woman"], "sofa": ["couch"], "unknown": ["cat"]}
    assert names_in_caption("two people on a couch", vocab, syn) == ["person", "sofa"]
    assert names_in_caption("a woman and a cat", vocab, syn) == ["person"]
    assert names_in_caption("a couches", vocab) == []


# -- CLIP filter -----------------------------------------------------------------------------------------

def test_relative_keep_rule():
    scores = torch.tensor([[0.30, 0.295, 0.20], [0.10, 0.25, 0.2449], [-0.10, -0.102, -0.30]])
    keep = relative_keep(scores, 0.97)
    pos = scores[:2] / scores[:2].max(-1, keepdim=True).values >= 0.97  # the rule as written, for top > 0
    assert torch.equal(keep[:2], pos)
    assert keep.tolist()[2] == [True, True, False]  # within 3 % of |top| below a negative top
    strict = relative_keep(scores, 1.5)  # nothing passes, the top class is still kept
    assert strict.sum(-1).tolist() == [1, 1, 1] and strict.float().argmax(-1).tolist() == [0, 1, 0]


def test_clip_filter_union_on_stubbed_scores(monkeypatch):
    vocab = ["cat", "dog", "car", "sky"]
    image_scores = torch.tensor([[0.30, 0.295, 0.10, 0.20], [0.10, 0.20, 0.25, 0.05]])
    caption_sim = torch.tensor([[0.10, 0.20, 0.85, 0.79], [0.80, 0.10, 0.10, 0.10]])
    monkeypatch.setattr(cf, "clip_image_class_scores", lambda clip, ims, voc, templates: image_scores)
    monkeypatch.setattr(cf, "encode_texts", lambda clip, texts: caption_sim)
    monkeypatch.setattr(cf, "class_text_features", lambda clip, names, templates: torch.eye(len(names)))
    ims = [None, None]
    assert cf.clip_filter(None, ims, vocab) == [["cat", "dog"], ["car"]]
    assert cf.clip_filter(None, ims, vocab, captions=["c1", "c2"]) == [["cat", "dog", "car"], ["cat", "car"]]
    assert cf.clip_filter(None, ims, vocab, captions=["c1", "c2"], text_threshold=0.9, rel_threshold=0.5) == \
        [["cat", "dog", "sky"], ["dog", "car"]]
    with pytest.raises(ValueError):
        cf.clip_filter(None, ims, vocab, captions=["only one"])


def test_clip_image_class_scores_restated(clip, images):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    vocab = ["cat", "dining table", "car"]
    templates = ("a photo of a {}.", "a drawing of the {}.")
    got = clip_image_class_scores(clip, images, vocab, templates)
    pixels = CLIPImageProcessorPil()(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        img = F.normalize(clip.model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        enc = clip.tokenizer([t.format(v) for v in vocab for t in templates], padding=True, return_tensors="pt")
        txt = F.normalize(clip.model.get_text_features(input_ids=enc["input_ids"]).pooler_output, dim=-1)
    txt = F.normalize(txt.view(3, 2, -1).mean(1), dim=-1)
    torch.testing.assert_close(got, img @ txt.T, atol=1e-5, rtol=0)
    assert clip_image_class_scores(clip, [], vocab).shape == (0, 3)


def test_clip_filter_on_model_matches_rule(clip, images):
    vocab = ["cat", "dog", "car", "sky", "tree"]
    scores = clip_image_class_scores(clip, images, vocab)
    expect = [[v for v, k in zip(vocab, row) if k] for row in relative_keep(scores).tolist()]
    assert clip_filter(clip, images, vocab) == expect
    assert clip_filter(clip, images, []) == [[]] * len(images)


# -- captioning ------------------------------------------------------------------------------------------

def test_caption_batched_equals_one_by_one_and_deterministic(blip, images):
    batched = caption_images(blip, images)
    assert batched == [caption_images(blip, [im])[0] for im in images]
    assert caption_images(blip, images) == batched
    assert len(set(batched)) > 1  # the images really condition the captions
    assert all(c == c.strip() and "[" not in c and len(c.split()) <= 19 for c in batched)  # [DEC] + 19 = 20
    assert caption_images(blip, []) == []


def test_caption_conditional_mixed_prompt_lengths(blip, images):
    prompts = ["a photograph of cat", "a photo of dog", "a photograph of dining table", "a photo of cat"]
    batched = caption_images(blip, images, prompts)
    assert batched == [caption_images(blip, [im], [p])[0] for im, p in zip(images, prompts)]
    assert all(c.startswith(p) for c, p in zip(batched, prompts))
    # max_length counts the prompt's tokens ([DEC] + one per word here): 20 in all, so at most 19 words
    assert all(len(c.split()) <= 19 for c in batched)
    short = caption_images(blip, images[:1], ["a photograph of dining table"], max_length=7)[0]
    assert short.startswith("a photograph of dining table") and len(short.split()) <= 6
    with pytest.raises(ValueError):
        caption_images(blip, images, prompts[:2])


# -- selectors -------------------------------------------------------------------------------------------

def test_selector_registry():
    assert list_selectors() == sorted(["all", "given", "blip_nouns", "clip", "blip_clip", "tagclip",
                                       "tagclip_blip"])
    with pytest.raises(ValueError, match="tagclip_blip"):
        get_selector("tagclip+blip")
    with pytest.raises(TypeError, match="preset"):
        get_selector("tagclip", presett="voc")
    assert get_selector("tagclip_blip").roles == ("tagger", "captioner")
    assert get_selector("clip").roles == ("tagger",)
    assert get_selector("blip_clip").roles == ("captioner", "filter")
    assert get_selector("all").roles == () and get_selector("given").roles == ()
    assert get_selector("tagclip_blip", clip_role="filter").roles == ("filter", "captioner")
    assert get_selector("clip", clip_role="filter").roles == ("filter",)


def test_all_and_given(images):
    vocab = ["cat", "dog", "car"]
    assert get_selector("all")(images[:2], vocab, models={}) == [vocab, vocab]
    given = get_selector("given")
    assert given(images[:2], vocab, models={}, given=[["car", "cat"], []]) == [["cat", "car"], []]
    with pytest.raises(ValueError, match="given"):
        given(images[:2], vocab, models={})
    with pytest.raises(ValueError, match="horse"):
        given(images[:1], vocab, models={}, given=[["horse"]])
    with pytest.raises(ValueError):
        given(images[:2], vocab, models={}, given=[["cat"]])


def test_blip_nouns(blip, images):
    vocab = ["person", "cat", "dog", "dining table", "table"]
    sel = get_selector("blip_nouns")
    assert sel(images[:2], vocab, models={}, captions=["a dog on a dining table", "two cats"]) == \
        [["dog", "dining table"], ["cat"]]
    caps = caption_images(blip, images)
    assert sel(images, vocab, models={"captioner": blip}) == [names_in_caption(c, vocab) for c in caps]


def test_clip_and_blip_clip(clip, images):
    vocab = ["cat", "dog", "car", "sky"]
    assert get_selector("clip")(images, vocab, models={"tagger": clip}) == clip_filter(clip, images, vocab)
    assert get_selector("clip", clip_role="filter")(images, vocab, models={"filter": clip}) == \
        clip_filter(clip, images, vocab)
    caps = ["a cat", "a dog on a car", "sky", "nothing"]
    got = get_selector("blip_clip", text_threshold=0.9)(images, vocab, models={"filter": clip}, captions=caps)
    assert got == clip_filter(clip, images, vocab, captions=caps, text_threshold=0.9)


def test_tagclip_selectors(clip, images):
    vocab = ["cat", "dining table", "person", "car"]
    aliases = {"dining table": "diningtable"}
    tags = tag_many(clip, images, ["cat", "diningtable", "person", "car"])
    tagged = get_selector("tagclip", aliases=aliases)(images, vocab, models={"tagger": clip})
    assert tagged == [[vocab[i] for i in t] for t in tags]
    caps = ["a person at a dining table", "two cats", "a car", "nothing here"]
    union = get_selector("tagclip_blip", aliases=aliases)(images, vocab, models={"tagger": clip}, captions=caps)
    for t, c, u in zip(tagged, caps, union):
        assert set(u) == set(t) | set(names_in_caption(c, vocab))
        assert u == [v for v in vocab if v in u]  # vocabulary order
    assert get_selector("tagclip_blip")(images, [], models={"tagger": clip}, captions=caps) == [[]] * 4
