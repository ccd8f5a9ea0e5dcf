"""Rule-based caption cleaning: each rule fires on its kind of noise and spares real captions."""

from __future__ import annotations

import pytest

from rssqa.data.caption_rules import RULES, RuleConfig, RuleCounter, check_caption, normalize_caption
from rssqa.errors import RSSQAError

CLEAN = [
    "An aerial image of a dense urban area with 12 buildings, mostly roads and 3 cars.",
    "satellite image of open countryside",
    "roads and a single building",
    "a stretch of coastline seen from above",
    "Vue aérienne d'une zone industrielle avec des entrepôts",
    "A high-resolution aerial view of a forested area with mostly trees.",
]
BROKEN = {
    "empty": ["", "   ", "\n\t"],
    "url": ["https://maps.example.org/tiles/17/123/456.png", "see www.example.com for more", "tiles at example.org/foo"],
    "filename": ["DJI_0421.JPG", "IMG_20190412_000123.jpg", "tile_12_3456.tif", "a view of scan00012.png today"],
    "boilerplate": ["Stock photo. High quality image, royalty free.", "Click here to see the full resolution version",
                    "All rights reserved. Do not reproduce without permission.", "Image may contain: outdoor, nature"],
    "non_text": ["1234 5678 90", "#### ---- ####", "caption with a \ufffd replacement"],
    "repeated": ["trees trees trees and a road", "forest forest, forest forest forest view"],
    "too_short": ["forest"],
    "truncated": ["An aerial image of", "A satellite view of a forest with", "houses and"],
    "uninformative": ["An aerial image", "A high-resolution aerial view", "satellite photo, top down"],
}  # fmt: skip


@pytest.mark.parametrize("text", CLEAN)
def test_clean_captions_pass(text):
    assert check_caption(normalize_caption(text)) is None


@pytest.mark.parametrize(("rule", "text"), [(r, t) for r, ts in BROKEN.items() for t in ts])
def test_each_rule_fires_on_its_noise(rule, text):
    assert check_caption(normalize_caption(text)) == rule


def test_too_long_and_bounds_are_configurable():
    long = " ".join(["roofs", "trees", "roads", "fields", "water"] * 14)
    assert check_caption(long) == "too_long"
    assert check_caption(long, RuleConfig(max_words=100)) is None
    assert check_caption("forest", RuleConfig(min_words=1)) is None


def test_disabled_rules_are_skipped_and_unknown_ones_refused():
    assert check_caption("DJI_0421.JPG", RuleConfig(disabled=("filename",))) == "non_text"
    with pytest.raises(RSSQAError, match="rules.disabled"):
        RuleConfig(disabled=("no_such_rule",))


def test_normalize_caption_unescapes_strips_tags_and_spaces():
    assert normalize_caption("  A&amp;B <b>roof</b>\n\n tops ") == "A&B roof tops"
    assert normalize_caption("ﬁelds") == "fields"  # NFKC folds the ligature


def test_counter_counts_every_rule_and_merges():
    c = RuleCounter()
    for text in ["", "DJI_0001.JPG", "DJI_0002.JPG", CLEAN[0]]:
        c.add(check_caption(text))
    d = c.as_dict()
    assert d["checked"] == 4 and d["rejected"] == 3
    assert d["counts"]["filename"] == 2 and d["counts"]["empty"] == 1
    assert set(d["counts"]) == set(RULES)
    c.update(d)
    assert c.checked == 8 and c.counts["filename"] == 4
