"""Incremental greedy decoding: one new token a step through cached prefixes gives open_clip's full-prefix
numbers, token for token, for the compact-vocabulary CoCa and for open_clip's own (full-vocabulary) one."""

from __future__ import annotations

import pytest
import torch

from rssqa.models.captioner import (
    EOT,
    SOT,
    CaptionVocab,
    _PrefixCache,
    create_captioner,
    greedy_decode,
    incremental_ok,
)


def _captioner(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    model, *_ = create_captioner(name, **kw)
    return model.eval()


@pytest.mark.parametrize("name", ["rs-coca-tiny", "coca_ViT-B-32"])
def test_incremental_decoding_gives_the_full_prefix_tokens(name):
    model = _captioner(name)
    assert incremental_ok(model)
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple | list) else size
    images = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1))
    sot, eot = (CaptionVocab.SOT, CaptionVocab.EOT) if name == "rs-coca-tiny" else (SOT, EOT)
    full = greedy_decode(model, images, 12, 3, sot, eot, incremental=False)
    cached = greedy_decode(model, images, 12, 3, sot, eot, incremental=True)
    assert torch.equal(full, cached)
    assert torch.equal(greedy_decode(model, images, 12, 3, sot, eot), cached)  # the default where the model allows it


@pytest.mark.parametrize("correct_cls_mask", [False, True])
@torch.no_grad()
def test_each_cached_step_matches_the_whole_prefix_padding_ids_included(correct_cls_mask):
    """Teacher-forced: after every token of a prefix holding the padding id (0: the text tower masks its key,
    or with open_clip's legacy CoCa mask the key after it), the cached hidden state equals the last position
    of the towers run on the whole prefix."""
    model = _captioner("rs-coca-tiny")
    model.text.correct_cls_mask = correct_cls_mask
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    _, image_embs = model._encode_image(images)
    prefix = torch.tensor([[1, 9, 0, 17, 33, 0, 5], [1, 4, 4, 0, 0, 8, 2], [1, 300, 12, 7, 9, 11, 0]])
    cache = _PrefixCache(model, image_embs)
    proj = model.text_decoder.text_projection
    for t in range(prefix.shape[1]):
        _, token_embs = model._encode_text(prefix[:, : t + 1])
        whole = model.text_decoder(image_embs, token_embs)[:, -1]
        step = cache.step(prefix[:, t], t) @ proj
        torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-4)
    cache.keep(torch.tensor([True, False, True]))  # rows that ended leave the cache
    assert cache.image_embs.shape[0] == 2 and all(p.shape[0] == 2 for p in cache.past)
