"""The RS-SQA head and its losses on synthetic tensors."""

import pytest
import torch

from rssqa.errors import RSSQAError
from rssqa.losses import SQALoss, listwise_loss, pairwise_rank_loss, plcc_loss
from rssqa.models.sqa import RSSQA, VARIANTS, CrossGating, Standardize

E, T, S, G, GRID, FEAT = 16, 12, 5, 7, 4, 6


def _batch(b=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "sem_embed": torch.randn(b, E, generator=g),
        "sem_tokens": torch.randn(b, T, 8, 8, generator=g),
        "seg_cells": torch.randn(b, S, GRID, GRID, generator=g),
        "seg_global": torch.randn(b, G, generator=g),
    }


def _model(variant="full", **kw):
    torch.manual_seed(0)
    return RSSQA(E, T, S, G, grid=GRID, width=16, hidden=16, variant=variant, **kw).eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_scores_are_in_unit_interval(variant):
    out = _model(variant)(_batch())
    assert out.shape == (6,)
    assert torch.all((out > 0) & (out < 1))


def test_output_prior_starts_the_score_at_the_typical_oa():
    """The last layer's bias at the logit of the training split's mean OA: with its weights zeroed every row
    scores exactly that; with them as initialised, the scores centre on it rather than on 0.5."""
    model = _model()
    before = model(_batch(64)).mean().item()
    model.set_output_prior(0.8)
    assert model(_batch(64)).mean().item() == pytest.approx(0.8, abs=0.05) and abs(before - 0.5) < 0.1
    with torch.no_grad():
        model.head[-1].weight.zero_()
    assert torch.allclose(model(_batch()), torch.full((6,), 0.8))
    model.set_output_prior(1.0)  # clipped: a finite logit
    assert torch.allclose(model(_batch()), torch.full((6,), 0.99))


def test_agreement_prior_starts_the_score_at_the_calibrated_vote():
    """Fitted on training rows whose OA the agreement predicts, the head scores new rows by that fit before
    any training (with the last layer's weights zeroed, exactly the fit); without it the term is zero."""
    g = torch.Generator().manual_seed(3)
    agree = torch.rand(400, 3, generator=g)
    oa = torch.sigmoid(4.0 * agree[:, 1] - 1.0) + 0.02 * torch.randn(400, generator=g)
    model = _model("seg_only", agreement=True, agreement_skip=True)
    model.norm_agree_global.set_stats(agree.mean(0), agree.std(0))
    batch = {**_batch(400), "agree_maps": agree[:, :, None, None].expand(-1, -1, GRID, GRID), "agree_global": agree}
    assert torch.equal(model.agreement_offset(agree), torch.zeros(400))
    model.set_agreement_prior(agree, oa)
    with torch.no_grad():
        model.head[-1].weight.zero_()
        fit = model(batch)
    assert (fit - oa).abs().mean() < 0.03 < (oa - oa.mean()).abs().mean()
    with pytest.raises(RSSQAError, match="agreement_skip"):
        _model("seg_only", agreement=True).set_agreement_prior(agree, oa)
    with pytest.raises(RSSQAError, match="at least 2 rows"):
        model.set_agreement_prior(agree[:1], oa[:1])


def test_ablations_ignore_the_branch_they_drop():
    a, b = _batch(seed=0), _batch(seed=1)
    img, seg, full = _model("image_only"), _model("seg_only"), _model("full")
    mixed = {**a, "seg_cells": b["seg_cells"], "seg_global": b["seg_global"]}
    assert torch.equal(img(a), img(mixed))
    mixed = {**a, "sem_embed": b["sem_embed"], "sem_tokens": b["sem_tokens"]}
    assert torch.equal(seg(a), seg(mixed))
    assert not torch.allclose(full(a), full(mixed))  # the gate reads semantics


def test_cross_gating_is_residual_on_zero_gate():
    block = CrossGating(8)
    seg = torch.randn(2, 3, 8)
    # a gate of GELU(very negative) = 0 leaves only the (normalised) residual plus the output bias
    with torch.no_grad():
        block.proj_sem.weight.zero_()
        block.proj_sem.bias.fill_(-50.0)
    expected = block.norm(seg + block.proj_out.bias)
    assert torch.allclose(block(seg, torch.randn(2, 3, 8)), expected, atol=1e-5)


def test_per_method_adapters_and_unseen_methods():
    m = _model(methods=["unet", "fpn"], feat_dim=FEAT)
    with torch.no_grad():
        m.method_weight.normal_()
        m.method_bias.normal_()
    batch = _batch(b=3)
    feats = torch.randn(3, FEAT, GRID, GRID)
    idx = m.method_index(["unet", "fpn", "never_seen"])
    assert idx.tolist() == [0, 1, -1]
    with_feats = m({**batch, "seg_feats": feats, "method_idx": idx})
    shared_only = m(batch)
    assert not torch.allclose(with_feats[:2], shared_only[:2])
    assert torch.equal(with_feats[2], shared_only[2])  # an unseen method goes through the shared adapter only


def test_adapters_and_shared_semantics_equal_the_row_by_row_formula():
    """The per-method adapters (one product per method present) equal, row by row, standardising the
    row's features with its method's statistics and multiplying by its method's weight; the semantic
    tokens of the methods of one image (computed once per image) equal those computed row by row."""
    m = _model(methods=["unet", "fpn", "pspnet"], feat_dim=FEAT)
    with torch.no_grad():
        m.method_weight.normal_()
        m.method_bias.normal_()
    m.set_feature_stats(torch.randn(3, FEAT), torch.rand(3, FEAT) + 0.5)
    feats = torch.randn(5, FEAT, GRID, GRID)
    idx = torch.tensor([2, 0, -1, 2, 1])
    flat = feats.flatten(2).transpose(1, 2)
    expected = torch.stack([
        torch.zeros(GRID * GRID, 16) if i < 0
        else (flat[r] - m.feat_mean[i]) / m.feat_std[i] @ m.method_weight[i] + m.method_bias[i]
        for r, i in enumerate(idx.tolist())
    ])  # fmt: skip
    assert torch.allclose(m._adapt(flat, idx), expected, atol=1e-5)

    one = _batch(b=2)
    images = torch.tensor([0, 1, 0, 1, 1])  # two images, their methods interleaved
    batch = {k: v[images] for k, v in one.items()}
    rows = m.encode_semantics(batch["sem_embed"], batch["sem_tokens"])
    shared = m({**batch, "image_idx": images})
    assert torch.allclose(shared, m.score(rows, m.encode_segmentation(batch["seg_cells"], batch["seg_global"])), atol=1e-6)
    pooled = torch.nn.functional.adaptive_avg_pool2d(m.norm_tokens(batch["sem_tokens"]), GRID)
    x = m.sem_tokens(pooled.flatten(2).transpose(1, 2)) + m.sem_embed(m.norm_embed(batch["sem_embed"])).unsqueeze(1)
    assert torch.allclose(rows, m.sem_norm(x + m.pos), atol=1e-6)  # the pooling is adaptive average pooling


def test_standardisation_buffers_travel_with_the_state_dict():
    m = _model()
    m.norm_global.set_stats(torch.full((G,), 2.0), torch.full((G,), 3.0))
    fresh = _model()
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(_batch()), m(_batch()))


def test_a_channel_constant_in_training_is_centred_not_blown_up():
    # the seventh-largest class share: 0 on every training image (six classes), 0.06 on a new source's image
    norm = Standardize(3)
    norm.set_stats(torch.tensor([0.5, 0.0, 0.0]), torch.tensor([0.2, 0.0, 1e-9]))
    z = norm(torch.tensor([[0.7, 0.06, 0.0]]))
    assert torch.allclose(z, torch.tensor([[1.0, 0.06, 0.0]]))
    m = _model(methods=["a"], feat_dim=FEAT)
    m.set_feature_stats(torch.zeros(1, FEAT), torch.zeros(1, FEAT))
    assert torch.equal(m.feat_std, torch.ones(1, FEAT))


def test_bad_configuration_and_grid():
    with pytest.raises(RSSQAError, match="variant"):
        RSSQA(E, T, S, G, variant="nope")
    with pytest.raises(RSSQAError, match="feat_dim"):
        RSSQA(E, T, S, G, methods=["unet"])
    with pytest.raises(RSSQAError, match="grid"):
        _model()({**_batch(), "seg_cells": torch.randn(6, S, 3, 3)})


def test_losses_by_hand():
    t = torch.tensor([0.5, 0.6, 0.7, 0.8])
    assert plcc_loss(2 * t + 1, t).item() == pytest.approx(0.0, abs=1e-6)
    assert plcc_loss(-t, t).item() == pytest.approx(1.0, abs=1e-6)
    assert plcc_loss(torch.ones(4), t).item() == 0.0
    # correct order -> small loss; reversed -> large; no ordered pairs -> 0
    assert pairwise_rank_loss(t, t) < pairwise_rank_loss(-t, t)
    assert pairwise_rank_loss(t, torch.full((4,), 0.5)).item() == 0.0
    # pairs only within a group: the wrongly ordered pair across groups is not counted
    pred = torch.tensor([0.9, 0.1, 0.2, 0.3])
    groups = torch.tensor([0, 0, 1, 1])
    across = pairwise_rank_loss(pred, t, groups)
    assert across.item() == pytest.approx(
        pairwise_rank_loss(pred[2:], t[2:]).item() / 2 + pairwise_rank_loss(pred[:2], t[:2]).item() / 2
    )


def test_listwise_loss_by_hand():
    t = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.8, 0.5])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])  # group 2 has one row: no order to learn
    right = torch.tensor([0.9, 0.5, 0.4, 0.3, 0.8, 0.0])
    wrong = torch.tensor([0.4, 0.5, 0.9, 0.8, 0.3, 0.0])
    assert listwise_loss(right, t, groups) < 0.01 < 1.0 < listwise_loss(wrong, t, groups)
    # one offset per image changes nothing; the lone row's score does not count
    shifted = right + torch.tensor([0.1, 0.1, 0.1, -0.2, -0.2, 5.0])
    assert listwise_loss(shifted, t, groups).item() == pytest.approx(listwise_loss(right, t, groups).item(), rel=1e-5)
    # the mean over groups of the two-row cross-entropy, computed by hand for group 1
    pred = torch.tensor([0.0, 0.0, 0.0, 0.2, 0.1, 0.0])
    p_true = torch.softmax(t[3:5] / 0.02, 0)
    ce1 = -(p_true * torch.log_softmax(20 * pred[3:5], 0)).sum()
    ce0 = -(torch.softmax(t[:3] / 0.02, 0) * torch.log_softmax(20 * pred[:3], 0)).sum()
    assert listwise_loss(pred, t, groups).item() == pytest.approx(((ce0 + ce1) / 2).item(), rel=1e-5)
    assert listwise_loss(pred, t, torch.arange(6)).item() == 0.0


def test_loss_switches_and_weights():
    pred = torch.tensor([0.3, 0.9, 0.5], requires_grad=True)
    t = torch.tensor([0.6, 0.7, 0.8])
    only_mse = SQALoss(w_mse=1.0, w_plcc=0.0, w_rank=0.0)(pred, t)
    assert only_mse["loss"].item() == pytest.approx(torch.mean((pred - t) ** 2).item())
    assert only_mse["rank"].item() == 0.0 and only_mse["plcc"].item() == 0.0
    both = SQALoss(w_mse=0.0, w_plcc=2.0, w_rank=3.0)(pred, t)
    assert both["loss"].item() == pytest.approx(2 * both["plcc"].item() + 3 * both["rank"].item())
    both["loss"].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    with pytest.raises(RSSQAError):
        SQALoss(0, 0, 0)
    images = torch.tensor([0, 0, 1])
    same = SQALoss(w_mse=0.0, w_plcc=0.0, w_rank=1.0, w_rank_image=4.0)(pred, t, images)
    assert same["rank_image"].item() == pytest.approx(pairwise_rank_loss(pred[:2], t[:2]).item())  # the one same-image pair
    assert same["loss"].item() == pytest.approx(same["rank"].item() + 4 * same["rank_image"].item())
    listwise = SQALoss(w_mse=0.0, w_plcc=0.0, w_rank=0.0, w_list=2.0)(pred, t, torch.tensor([0, 0, 1]))
    assert listwise["loss"].item() == pytest.approx(2 * listwise_loss(pred, t, torch.tensor([0, 0, 1])).item())


def test_full_model_learns_a_gated_target():
    """OA depends on a seg statistic, scaled by an image property: the gated model fits it."""
    torch.manual_seed(0)
    n = 128
    batch = _batch(b=n, seed=3)
    target = torch.sigmoid(batch["seg_global"][:, 0] * batch["sem_embed"][:, 0].sign())
    model = _model("full").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = SQALoss(1.0, 0.5, 0.5)
    first = None
    for _ in range(80):
        loss = loss_fn(model(batch), target)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3 * first


def test_feature_descriptors_by_hand():
    from rssqa.models.quality_inputs import feature_descriptors

    feat = torch.zeros(1, 2, 2, 2)
    feat[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 3.0]])  # three cells along channel 0
    feat[0, 1, 1, 1] = 3.0  # ... and the strong cell points halfway to channel 1
    d = feature_descriptors(feat)
    assert d.shape == (1, 3, 2, 2)
    norms = torch.tensor([[1.0, 1.0], [1.0, 18**0.5]])
    assert torch.allclose(d[0, 0], norms / norms.mean(), atol=1e-5)
    cos = 2**-0.5
    # coherence of the top-left cell: both neighbours point the same way
    assert d[0, 2, 0, 0].item() == pytest.approx(1.0, abs=1e-5)
    assert d[0, 2, 1, 1].item() == pytest.approx(cos, abs=1e-5)
    # the mean feature is (1.5, 0.75): the strong cell dominates it
    mean_dir = torch.tensor([1.5, 0.75]) / torch.tensor([1.5, 0.75]).norm()
    assert d[0, 1, 0, 0].item() == pytest.approx(mean_dir[0].item(), abs=1e-5)
    assert d[0, 1, 1, 1].item() == pytest.approx(cos * mean_dir.sum().item(), abs=1e-5)


def test_segmentation_inputs_same_from_segmenter_and_from_cache(tmp_path):
    """The scorer (fresh describe) and training (float16 label shard) see identical inputs."""
    from rssqa.data.sqed import read_label_shard, write_label_shard
    from rssqa.models.quality_inputs import segmentation_input_dims, segmentation_inputs
    from rssqa.models.segmenters import build_segmenter

    torch.manual_seed(0)
    seg = build_segmenter("pspnet", num_classes=5, grid=4, hist_bins=10).eval()
    out = seg.describe(torch.rand(3, 3, 32, 32))
    out.pop("logits")
    path = tmp_path / "shard.safetensors"
    write_label_shard(path, {k: v.numpy() for k, v in out.items()}, {"method": "pspnet"})
    cached, _ = read_label_shard(path)
    fresh = segmentation_inputs(out, max_classes=6, feat_dim=140)
    stored = segmentation_inputs(cached, max_classes=6, feat_dim=140)
    s, g = segmentation_input_dims(["encoder", "decoder"], hist_bins=10, max_classes=6)
    assert fresh["seg_cells"].shape == (3, s, 4, 4)
    assert fresh["seg_global"].shape == (3, g)
    assert fresh["seg_feats"].shape == (3, 140, 4, 4)
    for k in fresh:
        assert torch.equal(fresh[k], stored[k]), k
    with pytest.raises(RSSQAError, match="narrower"):
        segmentation_inputs(out, feat_dim=8)
    with pytest.raises(RSSQAError, match="missing"):
        segmentation_inputs({"maps": out["maps"]})
