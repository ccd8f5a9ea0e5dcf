"""The method registry, the Segmenter wrapper, its feature hooks and probability statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rssqa import baselines
from rssqa.errors import RSSQAError
from rssqa.models.segmenters import (
    MethodSpec,
    Segmenter,
    add_method_config,
    build_segmenter,
    get_method_config,
    list_methods,
    load_encoder_weights,
    probability_statistics,
    resolve_method,
)

EIGHT = {"unet", "deeplabv3plus", "fpn", "pspnet", "linknet", "manet", "upernet", "segformer"}


def test_registry_has_eight_distinct_methods():
    assert set(list_methods()) >= EIGHT
    specs = [resolve_method(m, "tiny") for m in sorted(EIGHT)]
    assert len({s.arch for s in specs}) == 8
    # they differ like real methods: encoders, budgets
    assert len({s.encoder_name for s in specs}) >= 3
    assert len({s.epochs_scale for s in specs}) >= 3
    for m in EIGHT:
        assert resolve_method(m, "base").encoder_name != resolve_method(m, "tiny").encoder_name


@pytest.mark.parametrize("method", sorted(EIGHT))
def test_every_method_builds_segments_and_describes(method):
    torch.manual_seed(0)
    seg = build_segmenter(method, num_classes=5, grid=2, hist_bins=10).eval()
    x = torch.rand(2, 3, 32, 32)
    logits = seg(x)
    assert logits.shape == (2, 5, 32, 32)
    out = seg.describe(x)
    assert torch.equal(out["logits"], logits)
    for layer in ("encoder", "decoder"):
        f = out[f"feat/{layer}"]
        assert f.shape[0] == 2 and f.shape[2:] == (2, 2) and torch.isfinite(f).all()
    assert out["maps"].shape == (2, 3, 2, 2)
    assert out["hist_conf"].shape == (2, 10) and out["class_share"].shape == (2, 5)
    shapes = seg.feature_shapes(32)
    assert shapes["maps"] == (3, 2, 2) and "logits" not in shapes


def test_capacity_differs():
    sizes = {
        m: sum(p.numel() for p in build_segmenter(m, 6).parameters()) for m in ("unet", "pspnet", "segformer")
    }
    assert sizes["unet"] > 5 * sizes["pspnet"] and sizes["segformer"] > sizes["pspnet"]


def test_any_image_size_is_padded_and_cropped():
    seg = build_segmenter("unet", 3).eval()
    assert seg(torch.rand(1, 3, 45, 70)).shape == (1, 3, 45, 70)
    with pytest.raises(RSSQAError, match=r"expected images B x 3 x H x W, got \(1, 4, 32, 32\)"):
        seg(torch.rand(1, 4, 32, 32))


def test_describe_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    seg = build_segmenter("fpn", 4).eval()
    x = torch.rand(3, 3, 32, 32)
    alone = seg.describe(x[1:2])
    batch = seg.describe(x)
    for k, v in alone.items():
        torch.testing.assert_close(batch[k][1:2], v, rtol=1e-5, atol=1e-5)


def test_statistics_agree_with_the_baselines():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 4, 8, 8, generator=g) * 2, dim=1)
    s = probability_statistics(probs, grid=2, bins=10)
    torch.testing.assert_close(s["msp"], baselines.msp(probs))
    torch.testing.assert_close(s["entropy"], baselines.entropy(probs))
    torch.testing.assert_close(s["margin"], baselines.margin(probs))
    torch.testing.assert_close(s["hist_conf"], baselines.confidence_histogram(probs, 10))
    for k in ("hist_conf", "hist_certainty", "hist_margin", "class_share"):
        torch.testing.assert_close(s[k].sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(s["mean_prob"].sum(1), torch.ones(3, dtype=torch.float64))
    # the pooled maps average to the per-image means
    torch.testing.assert_close(s["maps"][:, 0].mean((1, 2)), s["msp"])
    torch.testing.assert_close(s["maps"][:, 2].mean((1, 2)), s["margin"])
    torch.testing.assert_close(s["maps"][:, 1].mean((1, 2)), s["entropy"])


def test_statistics_of_float32_maps_match_float64():
    # a softmax gives float32: the per-pixel work stays in float32, every output is float64 and equal
    # to the float64 computation (histograms to one pixel of the 4096 here, the rest to 1e-6)
    g = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(4, 6, 64, 64, generator=g) * 3, dim=1)
    s32, s64 = probability_statistics(probs, grid=4, bins=20), probability_statistics(probs.double(), grid=4, bins=20)
    for k, v in s64.items():
        assert s32[k].dtype == torch.float64, k
        tol = 1.0 / (64 * 64) if k.startswith("hist_") else 1e-6
        torch.testing.assert_close(s32[k], v, atol=tol, rtol=0, msg=k)


def test_statistics_hand_computed():
    # one image, two pixels: (0.7, 0.25, 0.05) and (0.1, 0.1, 0.8)
    p = torch.tensor([[0.7, 0.1], [0.25, 0.1], [0.05, 0.8]], dtype=torch.float64).reshape(1, 3, 1, 2)
    s = probability_statistics(p, grid=1, bins=4)
    assert s["class_share"].tolist() == [[0.5, 0.0, 0.5]]
    assert s["hist_conf"].tolist() == [[0.0, 0.0, 0.5, 0.5]]  # 0.7 -> bin 2, 0.8 -> bin 3
    assert s["hist_margin"].tolist() == [[0.0, 0.5, 0.5, 0.0]]  # margins 0.45 -> bin 1, 0.7 -> bin 2
    h1 = -(0.7 * math.log(0.7) + 0.25 * math.log(0.25) + 0.05 * math.log(0.05))
    h2 = -(0.2 * math.log(0.1) + 0.8 * math.log(0.8))
    assert s["maps"][0, 1, 0, 0].item() == pytest.approx(1 - (h1 + h2) / 2 / math.log(3))
    assert s["maps"][0, 2, 0, 0].item() == pytest.approx((0.45 + 0.7) / 2)


def test_overrides_and_errors(tmp_path):
    spec = resolve_method(
        "unet", "tiny", {"encoder_name": "tu-lcnet_050", "lr": 0.5, "decoder_channels": [8, 8, 8, 8, 8]}
    )
    assert (
        spec.encoder_name == "tu-lcnet_050"
        and spec.lr == 0.5
        and spec.model_kwargs["decoder_channels"] == [8] * 5
    )
    assert spec.epochs(4) == 4 and MethodSpec("x", "unet", "e", epochs_scale=0.1).epochs(4) == 1
    with pytest.raises(RSSQAError, match="method 'nope' unknown"):
        resolve_method("nope")
    with pytest.raises(RSSQAError, match="no size 'huge'"):
        resolve_method("unet", "huge")
    with pytest.raises(RSSQAError, match="smp cannot build"):
        build_segmenter("unet", 3, overrides={"encoder_name": "no-such-encoder"})
    with pytest.raises(RSSQAError, match="no module 'nowhere'"):
        build_segmenter("unet", 3, overrides={"features": {"x": {"module": "nowhere"}}})


def test_add_method_config_from_file(tmp_path, monkeypatch):
    from rssqa.models import segmenters

    monkeypatch.setattr(segmenters, "_REGISTRY", dict(segmenters._REGISTRY))  # leave no trace in other tests
    cfg = get_method_config("linknet")
    cfg["description"] = "a user's method"
    path = tmp_path / "my_linknet.json"
    path.write_text(json.dumps(cfg))
    assert add_method_config(path) == "my_linknet"
    assert resolve_method("my_linknet").description == "a user's method"
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(RSSQAError, match=r"broken\.json: not valid JSON"):
        add_method_config(tmp_path / "broken.json")
    with pytest.raises(RSSQAError, match="lacks 'features'"):
        add_method_config("partial", {"arch": "unet", "sizes": {}})


def test_local_encoder_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    trained = build_segmenter("linknet", 3)
    save_file(trained.model.encoder.state_dict(), str(tmp_path / "enc.safetensors"))
    torch.save(
        {"state_dict": {f"encoder.{k}": v for k, v in trained.model.encoder.state_dict().items()}},
        tmp_path / "m.pt",
    )
    for name in ("enc.safetensors", "m.pt"):
        torch.manual_seed(2)
        fresh = Segmenter(
            resolve_method("linknet", overrides={"encoder_weights_path": str(tmp_path / name)}), 3
        )
        for (k, a), b in zip(
            trained.model.encoder.state_dict().items(), fresh.model.encoder.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), k
    torch.save({"other": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(RSSQAError, match=r"wrong\.pt: no tensor matches"):
        load_encoder_weights(fresh.model.encoder, tmp_path / "wrong.pt")
    with pytest.raises(RSSQAError, match=r"absent\.pt: encoder weights not found"):
        load_encoder_weights(fresh.model.encoder, tmp_path / "absent.pt")
