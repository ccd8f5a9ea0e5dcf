"""Rule-based caption cleaning: the cheap first pass of purification.

Scraped image-text corpora carry captions that no model needs to look at to reject: links, file
names, web-page boilerplate, stuttering repeats, captions cut off mid-phrase, captions that name
nothing ("an aerial image"), too short or too long, empty or not text at all. :func:`check_caption` names the first rule a caption breaks (or None);
:class:`RuleCounter` counts how often each rule fires. A rejected caption does not reject its image:
purification hands the image to the captioner instead.

Rules are a registry (:data:`RULES`, name -> predicate), applied in registry order; a
:class:`RuleConfig` sets their bounds and picks which ones run.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from rssqa.errors import RSSQAError

# Phrases of stock-photo sites, social media and web pages, lower case; matched as substrings.
DEFAULT_BOILERPLATE: tuple[str, ...] = (
    "stock photo",
    "stock image",
    "royalty free",
    "royalty-free",
    "all rights reserved",
    "copyright",
    "click here",
    "click to enlarge",
    "download this",
    "free download",
    "wallpaper",
    "image may contain",
    "photo by",
    "image by",
    "shutterstock",
    "getty images",
    "alamy",
    "high quality image",
    "hd 4k",
    "do not reproduce",
    "subscribe",
    "follow us",
    "lorem ipsum",
)
# Words that say how a picture was taken, not what it shows; a caption of only these (and function
# words) names nothing: "an aerial image", "satellite view", "photo".
_GENERIC = """a an the of with and or in on at to from by for this that is are it its showing shows shown seen
    above over top down image images photo photos photograph picture pic view views aerial satellite
    overhead remote sensing high resolution high-resolution low hd shot scene drone orthophoto imagery
    camera taken captured capture untitled caption description no none null"""
GENERIC_WORDS: frozenset[str] = frozenset(_GENERIC.split())
# A caption cut off mid-phrase ends on a word that cannot end an English noun phrase.
_DANGLING = "a an the of with and or in on at to from by for showing over near along between into"
DANGLING_WORDS: frozenset[str] = frozenset(_DANGLING.split())

_URL = re.compile(
    r"(https?://|ftp://|www\.)\S+|\b\S+\.(com|org|net|edu|gov|io|de|fr|cn)(/\S*)?\b", re.IGNORECASE
)
_FILENAME = re.compile(
    r"\b[\w\-.]*\.(jpe?g|png|gif|bmp|tiff?|webp|jp2|heic|raw|dng|img|ecw|sid)\b"
    r"|\b(dji|img|dsc|dscn|dcim|gopr|pxl)_?\d{3,}\b",
    re.IGNORECASE,
)
_WORD = re.compile(r"[^\W\d_]+(?:[-'][^\W\d_]+)*|\d+", re.UNICODE)
_TAG = re.compile(r"<[^>]{1,200}>")
_SPACE = re.compile(r"\s+")


@dataclass
class RuleConfig:
    """Bounds and switches of the caption rules.

    Attributes:
        min_words: fewer words than this is ``too_short``.
        max_words: more words than this is ``too_long``.
        min_letter_share: share of letters among non-space characters below which a caption is ``non_text``.
        max_word_share: share of the most frequent word (captions of >= 4 words) above which it is ``repeated``.
        max_run: a word repeated this many times in a row is ``repeated``.
        boilerplate: lower-case phrases that mark web boilerplate.
        generic_words: words that name no content (a caption of only these is ``uninformative``).
        disabled: rule names not to apply.
    """

    min_words: int = 2
    max_words: int = 60
    min_letter_share: float = 0.6
    max_word_share: float = 0.5
    max_run: int = 3
    boilerplate: tuple[str, ...] = DEFAULT_BOILERPLATE
    generic_words: tuple[str, ...] = tuple(sorted(GENERIC_WORDS))
    disabled: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.boilerplate = tuple(p.lower() for p in self.boilerplate)
        self.generic = frozenset(w.lower() for w in self.generic_words)
        unknown = set(self.disabled) - set(RULES)
        if unknown:
            raise RSSQAError(f"rules.disabled: unknown rules {sorted(unknown)}; choose from {list(RULES)}")


def normalize_caption(text: str) -> str:
    """Unescape HTML entities, drop tags, normalise Unicode (NFKC) and collapse white space."""
    text = unicodedata.normalize("NFKC", html.unescape(text))
    return _SPACE.sub(" ", _TAG.sub(" ", text)).strip()


def words(text: str) -> list[str]:
    """Lower-case word tokens (letters, or digit runs) of ``text``."""
    return [w.lower() for w in _WORD.findall(text)]


def _empty(text: str, cfg: RuleConfig) -> bool:
    return not text.strip()


def _non_text(text: str, cfg: RuleConfig) -> bool:
    chars = [c for c in text if not c.isspace()]
    if any(unicodedata.category(c) in ("Cc", "Co", "Cs") or c == "\ufffd" for c in chars):
        return True
    letters = sum(c.isalpha() for c in chars)
    return letters / max(len(chars), 1) < cfg.min_letter_share


def _url(text: str, cfg: RuleConfig) -> bool:
    return _URL.search(text) is not None


def _filename(text: str, cfg: RuleConfig) -> bool:
    return _FILENAME.search(text) is not None


def _boilerplate(text: str, cfg: RuleConfig) -> bool:
    low = text.lower()
    return any(p in low for p in cfg.boilerplate)


def _repeated(text: str, cfg: RuleConfig) -> bool:
    ws = words(text)
    run = 1
    for a, b in zip(ws, ws[1:], strict=False):
        run = run + 1 if a == b else 1
        if run >= cfg.max_run:
            return True
    if len(ws) >= 4:
        top = Counter(w for w in ws if len(w) > 3).most_common(1)
        return bool(top) and top[0][1] / len(ws) > cfg.max_word_share
    return False


def _too_short(text: str, cfg: RuleConfig) -> bool:
    return len(words(text)) < cfg.min_words


def _too_long(text: str, cfg: RuleConfig) -> bool:
    return len(words(text)) > cfg.max_words


def _uninformative(text: str, cfg: RuleConfig) -> bool:
    return all(w in cfg.generic for w in words(text))


def _truncated(text: str, cfg: RuleConfig) -> bool:
    ws = words(text)
    return bool(ws) and ws[-1] in DANGLING_WORDS and not text.rstrip().endswith((".", "!", "?"))


RULES: dict[str, Callable[[str, RuleConfig], bool]] = {
    "empty": _empty,
    "url": _url,
    "filename": _filename,
    "boilerplate": _boilerplate,
    "non_text": _non_text,
    "repeated": _repeated,
    "too_short": _too_short,
    "too_long": _too_long,
    "truncated": _truncated,
    "uninformative": _uninformative,
}
"""Rule name -> predicate ``(normalised caption, config) -> True when the caption breaks the rule``."""


def check_caption(text: str, cfg: RuleConfig | None = None) -> str | None:
    """Return the name of the first rule ``text`` breaks, or None when it passes them all.

    Args:
        text: a caption, already passed through :func:`normalize_caption`.
        cfg: rule bounds (defaults when None).
    """
    cfg = cfg or RuleConfig()
    for name, rule in RULES.items():
        if name not in cfg.disabled and rule(text, cfg):
            return name
    return None


@dataclass
class RuleCounter:
    """How many captions each rule rejected, and how many were checked."""

    checked: int = 0
    counts: Counter[str] = field(default_factory=Counter)

    def add(self, rule: str | None) -> None:
        """Count one checked caption and the rule it broke (None: passed)."""
        self.checked += 1
        if rule is not None:
            self.counts[rule] += 1

    def update(self, other: RuleCounter | dict) -> None:
        """Add another counter (or its :meth:`as_dict`) into this one."""
        if isinstance(other, RuleCounter):
            other = other.as_dict()
        self.checked += int(other["checked"])
        self.counts.update({k: int(v) for k, v in other["counts"].items()})

    @property
    def rejected(self) -> int:
        """Captions that broke a rule."""
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """``{"checked": n, "rejected": n, "counts": {rule: n for every rule}}`` (JSON-able)."""
        return {
            "checked": self.checked,
            "rejected": self.rejected,
            "counts": {r: self.counts.get(r, 0) for r in RULES},
        }
