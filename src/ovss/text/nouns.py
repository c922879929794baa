"""Nouns of a caption, for FreeDA's offline bank (freeda.md §3 step 3).

The paper POS-tags captions with NLTK and keeps NN/NNS/NNP/NNPS tokens. NLTK's tagger needs a data
download that this project cannot rely on offline, so the default parser is rule-based and written for
short descriptive captions (COCO style): a word is a noun unless it is a function word (determiner,
pronoun, preposition, conjunction, auxiliary, number word, common adverb), a listed or suffix-marked verb
form (-ing / -ed, with the usual noun exceptions such as "building" or "bed"), or a listed adjective.
A word from the verb or adjective lists still counts as a noun right after a determiner ("a park",
"the sign"). Like NLTK, it keeps noun modifiers ("tennis" in "tennis racket"). It is a heuristic: the
bank it builds differs from the authors' where their tagger disagrees (documented in docs/methods/freeda.md).

`parser="nltk"` uses NLTK's averaged-perceptron tagger when its data is installed
(`python -m nltk.downloader averaged_perceptron_tagger_eng` on a machine with internet access).
"""
from __future__ import annotations

import re
from typing import Literal

NounParser = Literal["rules", "nltk"]
NOUN_PARSERS = ("rules", "nltk")
NLTK_NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})

_DETERMINERS = frozenset("""
a an the this that these those his her its their our my your some any each every another other no both
either neither several many few much more most all one two three four five six seven eight nine ten eleven
twelve thirteen fourteen fifteen twenty dozen couple pair lot lots bunch group number
""".split())
# "couple", "pair", "lot", "bunch", "group", "number" are nouns to NLTK, but in captions ("a couple of dogs")
# they quantify; they are kept out of the bank as their prototypes would pool whatever they quantify.

_FUNCTION_WORDS = _DETERMINERS | frozenset("""
i me we us you he him she they them it itself themselves himself herself someone something somebody anyone
anything nothing everything everyone who whom whose which what where when while why how whether if then than
as so such there here of in on at by for with without within into onto upon over under above below beneath
underneath behind beside besides between among amongst around about across along alongside against toward
towards through throughout past near nearby next to from off out up down inside outside before after during
until till via per like unlike amid atop and or but nor yet plus is are was were be been being am has have had
having do does did doing can could will would shall should may might must not nt very too also just
only almost quite really still even together away back again ever far well rather somewhat partially mostly
fully closely
""".split())

_VERBS = frozenset("""
sit sits stand stands ride rides hold holds look looks walk walks play plays eat eats fly flies lay lays lie
lies wait waits watch watches carry carries wear wears show shows take takes throw throws hit hits swing
swings prepare prepares cut cuts run runs jump jumps catch catches pull pulls push pushes drive drives park
parks go goes come comes get gets make makes use uses talk talks pose poses smile smiles drink drinks cook
cooks read reads fill fills cover covers top tops hang hangs lean leans rest rests face faces contain
contains feature features display displays seem seems appear appears try tries keep keeps give gives head
heads graze grazes surf surfs skate skates ski skis kick kicks swim swims float floats sleep sleeps
overlook overlooks pass passes cross crosses line lines sign signs serve serves see sees help helps work
works set sets say says let lets put puts turn turns stare stares gaze gazes
""".split())

_ADJECTIVES = frozenset("""
white black red green blue yellow orange purple pink brown gray grey silver gold golden dark light bright
colorful colourful large big small little tiny huge giant tall short long wide narrow old young new empty
full open closed clean dirty wet dry hot cold warm fresh sliced various different same
beautiful pretty nice cute good great fancy busy crowded quiet modern vintage wooden metal plastic glass
stone brick tiled grassy sandy snowy rocky sunny cloudy blurry messy neat single double multiple
first second third front top bottom left right middle side upper lower high low half whole entire
professional adult baby elderly male female traditional large-scale asian american mexican italian
chinese japanese french
""".split())
# "glass", "metal", "stone", "brick", "baby", "top", "front", "side" are nouns after a determiner.

_ING_NOUNS = frozenset("""
building buildings ceiling ceilings clothing painting paintings evening morning wedding weddings string
strings ring rings king kings thing things wing wings swing swings railing railings sibling siblings
topping toppings frosting icing stuffing pudding dumpling dumplings sling spring bedding lighting
awning awnings clearing landing ping
""".split())
_ED_NOUNS = frozenset("""
bed beds shed sled sleds seed seeds reed reeds weed weeds speed steed feed breed need hundred
""".split())

_LY_NOUNS = frozenset("family butterfly dragonfly firefly jelly belly lily rally bully supply assembly holly ally "
                      "anomaly monopoly".split())

_TOKEN = re.compile(r"[a-z]+(?:-[a-z]+)*")

_IRREGULAR_PLURALS = {
    "people": "person", "men": "man", "women": "woman", "children": "child", "feet": "foot", "teeth": "tooth",
    "mice": "mouse", "geese": "goose", "knives": "knife", "leaves": "leaf", "shelves": "shelf",
    "wolves": "wolf", "loaves": "loaf", "calves": "calf", "halves": "half", "wives": "wife", "lives": "life",
    "scarves": "scarf", "oxen": "ox", "buses": "bus", "glasses": "glass",
    "tomatoes": "tomato", "potatoes": "potato", "mangoes": "mango", "dice": "die", "cacti": "cactus", "skis": "ski",
}
_INVARIANT = frozenset("sheep fish deer series species bus gas glass grass dress class pants jeans "
                       "scissors news tennis lettuce".split())


def _is_verb_form(word: str) -> bool:
    if word in _VERBS:
        return True
    if word.endswith("ing") and len(word) > 4 and word not in _ING_NOUNS:
        return True
    return word.endswith("ed") and len(word) > 4 and word not in _ED_NOUNS


def _is_modifier(word: str) -> bool:
    """Listed adjectives and -ly adverbs ("quickly", "partly"), except -ly nouns such as "butterfly"."""
    return word in _ADJECTIVES or (word.endswith("ly") and len(word) > 4 and word not in _LY_NOUNS)


def rule_nouns(caption: str) -> list[str]:
    """Distinct lower-case nouns of `caption` in order of first appearance (rule-based, see module doc)."""
    tokens = _TOKEN.findall(caption.lower().replace("'s", " 's"))
    out: list[str] = []
    previous_noun = False
    for i, word in enumerate(tokens):
        if word in _FUNCTION_WORDS or len(word) < 2:
            previous_noun = False
            continue
        noun = not (_is_verb_form(word) or _is_modifier(word)) or _head_of_phrase(tokens, i, previous_noun)
        if noun and word not in out:
            out.append(word)
        previous_noun = noun
    return out


def _head_of_phrase(tokens: list[str], i: int, previous_noun: bool) -> bool:
    """A verb- or adjective-list word that ends a noun phrase is its head: right after a determiner ("a park",
    "the glass") or, in base form, after a singular noun ("a stop sign"). "A man rides" and "people walk"
    (a plural subject) keep the verb reading."""
    word, prev = tokens[i], tokens[i - 1] if i else ""
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    phrase_final = nxt is None or nxt in _FUNCTION_WORDS or _is_verb_form(nxt)
    if not phrase_final:
        return False
    if prev in _DETERMINERS or prev == "s":
        return True
    plural_subject = prev.endswith("s") or prev in _IRREGULAR_PLURALS
    return previous_noun and word in _VERBS and not word.endswith("s") and not plural_subject


def nltk_nouns(caption: str) -> list[str]:
    """Distinct lower-case NN/NNS/NNP/NNPS tokens from NLTK's perceptron tagger (its data must be installed)."""
    import nltk
    from nltk.tokenize import TreebankWordTokenizer

    tokens = TreebankWordTokenizer().tokenize(caption)
    try:
        tagged = nltk.pos_tag(tokens)
    except LookupError as err:
        raise RuntimeError("noun_parser='nltk' needs NLTK's tagger data: run `python -m nltk.downloader "
                           "averaged_perceptron_tagger_eng` where the internet is reachable, or use the "
                           "default noun_parser='rules'") from err
    out: list[str] = []
    for word, tag in tagged:
        w = word.lower()
        if tag in NLTK_NOUN_TAGS and w.isalpha() and w not in out:
            out.append(w)
    return out


def caption_nouns(caption: str, parser: NounParser = "rules") -> list[str]:
    """One entry per distinct noun string of the caption, lower-cased, in order of first appearance."""
    if parser == "rules":
        return rule_nouns(caption)
    if parser == "nltk":
        return nltk_nouns(caption)
    raise ValueError(f"unknown noun parser {parser!r}; use one of {NOUN_PARSERS}")


def singular(noun: str) -> str:
    """A rule-based singular ("dogs" -> "dog", "buses" stays "bus" when listed, "people" -> "person")."""
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun in _INVARIANT or len(noun) <= 3 or noun.endswith(("ss", "us", "is")):
        return noun
    if noun.endswith("ies") and len(noun) > 4:
        return noun[:-3] + "y"
    if noun.endswith(("ches", "shes", "xes", "zes", "sses")):
        return noun[:-2]
    if noun.endswith("s"):
        return noun[:-1]
    return noun
