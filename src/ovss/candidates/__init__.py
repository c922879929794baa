"""Per-image candidate classes: BLIP captions and caption nouns, a CLIP filter, TagCLIP, and the selectors
that methods plug in by name (`get_selector("tagclip_blip")`).

The `blip_clip` filter function is `ovss.candidates.clip_filter.clip_filter`: it is not re-exported here, where
its name would shadow its own module.
"""
from ovss.candidates.captioning import caption_images
from ovss.candidates.clip_filter import (IMAGENET_TEMPLATES, class_text_features, clip_image_class_scores,
                                         relative_keep)
from ovss.candidates.nouns import names_in_caption
from ovss.candidates.selectors import CandidateSelector, get_selector, list_selectors
from ovss.candidates.tagclip import TAGCLIP_TEMPLATES, background_words, tag, tag_many

__all__ = [
    "CandidateSelector", "IMAGENET_TEMPLATES", "TAGCLIP_TEMPLATES", "background_words", "caption_images",
    "class_text_features", "clip_image_class_scores", "get_selector", "list_selectors",
    "names_in_caption", "relative_keep", "tag", "tag_many",
]
