"""One implementation of the quality head's inputs: what the scorer computes live for an image equals
what RS-SQED labelling cached and the sqa data module reads for it, tensor for tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rssqa.errors import RSSQAError
from rssqa.models.quality_inputs import QualityInputs, method_statistics
from rssqa.models.segmenters import build_segmenter

SOURCE = "vaihingen"
METHODS = ["pspnet", "fpn", "linknet"]  # three: agreement between methods is computed too


@pytest.fixture(scope="module")
def built(tiny_world, tmp_path_factory):
    """A real RS-SQED build (sqed's own labelling), its data module and an exported scorer."""
    from rssqa.models.clip import create_clip, export_clip
    from rssqa.scorer import Scorer
    from rssqa.tasks.sqa import SQADataModule, SQATask, export_scorer
    from rssqa.tasks.sqed import LabelConfig, SourceConfig, SQEDConfig, TrainConfig, build_sqed

    root = tmp_path_factory.mktemp("quality_inputs")
    cfg = SQEDConfig(
        sources=[SourceConfig(SOURCE, str(tiny_world / "sources" / SOURCE))],
        methods=METHODS,
        splits={"seg": 0.25, "train": 0.25, "val": 0.25, "test": 0.25},
        on_bad="skip",
        train=TrainConfig(epochs=1, batch_size=8),
        # a prediction batch that is not a multiple of the chunk: labelling pads, as scoring does
        label=LabelConfig(grid=4, hist_bins=10, batch_size=5, chunk=3),
        wandb="disabled",
    )
    build_sqed(cfg, root / "sqed")
    torch.manual_seed(0)
    model, *_ = create_clip("rs-tiny", force_image_size=32)  # the tiny world's tiles are 32 px
    export_clip(model, "rs-tiny", root / "clip_rs")
    data = SQADataModule(str(root / "sqed"), str(root / "clip_rs"), per_method_features=True, clip_chunk=4)
    data.setup("fit")
    task = SQATask(per_method_adapters=True)
    task.build_for(data)
    agree = SQATask(per_method_adapters=True, agreement=True)
    agree.build_for(data)
    export_scorer(task, data, root / "scorer", agreement=agree)
    return data, Scorer.load(root / "scorer")


def test_scorer_inputs_equal_the_cached_rs_sqed_inputs(built):
    data, scorer = built
    assert data.seg_chunk == 3 and scorer.quality_inputs.seg_chunk == 3
    rows = data.sqed.rows
    keys = list(dict.fromkeys(r["key"] for r in rows))[:5]
    pool = data.sqed.images(SOURCE)
    first = {r["key"]: r for r in rows}
    images = [pool[first[k]["image_row"]] for k in keys]
    assert data.agree is not None
    for batch in ([images[0]], images):  # alone and among others
        live = scorer.inputs(batch, METHODS, SOURCE, agreement=True)
        for i, key in enumerate(keys[: len(batch)]):
            for j, method in enumerate(METHODS):
                row = next(n for n, r in enumerate(rows) if r["key"] == key and r["method"] == method)
                cached = data.batch(torch.tensor([row]))
                assert torch.equal(live["sem_embed"][i], cached["sem_embed"][0]), key
                assert torch.equal(live["sem_tokens"][i], cached["sem_tokens"][0]), key
                for name in ("seg_cells", "seg_global", "seg_feats", "agree_maps", "agree_global"):
                    assert torch.equal(live["methods"][j][name][i], cached[name][0]), (key, method, name)


def test_cached_and_live_differ_when_the_image_does(built):
    """The equality above is not vacuous: another image gives other inputs."""
    data, scorer = built
    pool = data.sqed.images(SOURCE)
    a, b = scorer.inputs([pool[0], pool[1]], METHODS, SOURCE)["methods"][0]["seg_cells"]
    assert not torch.equal(a, b)


def test_statistics_do_not_depend_on_the_batch():
    torch.manual_seed(0)
    seg = build_segmenter("fpn", 5, grid=4, hist_bins=10).eval()
    x = torch.rand(7, 3, 64, 64)
    together = method_statistics(seg, x, chunk=4)
    for i in (0, 5, 6):
        alone = method_statistics(seg, x[i : i + 1], chunk=4)
        for k in together:
            assert torch.equal(alone[k][0], together[k][i]), (i, k)
    # pixels straight from H×W×3 arrays arrive as a channels-last view: the same numbers
    strided = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not strided.is_contiguous()
    for k, v in method_statistics(seg, strided, chunk=4).items():
        assert torch.equal(v, together[k]), k


def test_quality_inputs_checks_its_settings():
    with pytest.raises(RSSQAError, match="seg_chunk: must be positive"):
        QualityInputs(seg_chunk=0)
    out = QualityInputs(("encoder", "decoder"), max_classes=6)(
        np.zeros((2, 64, 64, 3), np.uint8), [build_segmenter("pspnet", 5, grid=4, hist_bins=10).eval()]
    )
    assert "sem_embed" not in out and out["methods"][0]["seg_cells"].shape[:2] == (2, 9)


def test_agreement_columns_and_head(built):
    """The table's agreement baselines are the cached per-image means; the agreement head scores."""
    from rssqa.agreement import AGREEMENT_NAMES

    data, scorer = built
    rows = data.sqed.rows
    share = data.agree["agree_global"][:, AGREEMENT_NAMES.index("share")]
    assert np.allclose([r["agreement"] for r in rows], share.double().numpy(), rtol=1e-6)
    assert all(0 <= r["consensus"] <= 1 for r in rows)
    pool = data.sqed.images(SOURCE)
    paper = scorer.score([pool[0]], ["fpn"], SOURCE)
    with_agreement = scorer.score([pool[0]], ["fpn"], SOURCE, with_methods=["pspnet", "linknet"])
    assert paper.shape == with_agreement.shape == (1, 1) and not np.array_equal(paper, with_agreement)
    # the agreement head sees fpn's agreement with the others: the same as when all three are scored
    assert np.array_equal(with_agreement[0, 0], scorer.score([pool[0]], ["fpn", "pspnet", "linknet"], SOURCE, agreement=True)[0, 0])
    with pytest.raises(RSSQAError, match="at least 3 methods"):
        scorer.score([pool[0]], ["fpn"], SOURCE, with_methods=["pspnet"])
    ranked = scorer.recommend([pool[0]], source=SOURCE)[0]
    assert sorted(m for m, _ in ranked) == sorted(METHODS)


def test_agreement_skip_scores_alike_in_training_and_scoring(built, tmp_path):
    """The agreement's direct logit term: the exported scorer gives what the trained head gives on the
    cached inputs of the same row, and the term changes the score."""
    from rssqa.scorer import Scorer
    from rssqa.tasks.sqa import SQATask, export_scorer

    data, _ = built
    with pytest.raises(RSSQAError, match="agreement_skip: needs the agreement inputs"):
        SQATask(agreement_skip=True)
    task = SQATask(per_method_adapters=True)
    task.build_for(data)
    skip = SQATask(per_method_adapters=True, agreement=True, agreement_skip=True)
    skip.build_for(data)
    with torch.no_grad():
        skip.model.agree_logit.weight.fill_(0.5)
    export_scorer(task, data, tmp_path / "scorer", agreement=skip)
    scorer = Scorer.load(tmp_path / "scorer")
    assert scorer.agreement_model.agree_logit is not None
    rows = data.sqed.rows
    row = next(n for n, r in enumerate(rows) if r["method"] == "fpn")
    cached = data.batch(torch.tensor([row]))
    with torch.no_grad():
        trained = float(skip.model.eval()(cached)[0])
        image = data.sqed.images(SOURCE)[rows[row]["image_row"]]
        live = scorer.score([image], METHODS, SOURCE, agreement=True)[0, METHODS.index("fpn")]
        assert live == pytest.approx(trained, abs=1e-5)
        scorer.agreement_model.agree_logit.weight.zero_()
        assert scorer.score([image], METHODS, SOURCE, agreement=True)[0, METHODS.index("fpn")] != pytest.approx(live, abs=1e-4)


def test_agreement_prior_fits_the_direct_term_on_the_training_rows(built):
    """``agreement_prior``: the direct agreement term starts fitted to the train split (not at zero), so the
    untrained head's scores of the train rows sit closer to their OA than the train mean alone does."""
    from rssqa.tasks.sqa import SQATask

    data, _ = built
    with pytest.raises(RSSQAError, match="agreement_prior: needs the direct agreement term"):
        SQATask(agreement=True, agreement_prior=True)
    task = SQATask(agreement=True, agreement_skip=True, agreement_prior=True)
    task.build_for(data)
    assert task.model.agree_logit.weight.abs().sum() > 0
    train = torch.tensor(data.rows("train"))
    with torch.no_grad():
        task.model.head[-1].weight.zero_()  # the fit alone
        scores = task.model.eval()(data.batch(train))
    oa = data.oa[train]
    assert (scores - oa).pow(2).mean() < (oa - oa.mean()).pow(2).mean()
