"""CLIP build / load / export / encode (rssqa.models.clip)."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import save_file

from rssqa.errors import RSSQAError
from rssqa.models.clip import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    create_clip,
    encode_images,
    encode_texts,
    export_clip,
    list_clip_models,
    load_clip,
    to_model_input,
)

TEXTS = ["an aerial image of a forest", "a suburban neighbourhood with houses and roads", "", "water"]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, _, tokenizer = create_clip("rs-tiny")
    return model, tokenizer


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(5, 64, 64, 3), dtype=np.uint8)


def test_registry_lists_ours_and_open_clip():
    names = list_clip_models()
    assert {"rs-small", "rs-tiny"} <= set(names[: names.index("rs-tiny") + 1])
    assert all(n.startswith("rs-") for n in names[: names.index("rs-tiny")])  # ours first
    assert {"ViT-B-32", "ViT-L-14"} <= set(names)
    cfg = open_clip.get_model_config("rs-tiny")
    assert cfg["vision_cfg"]["image_size"] == 64 and cfg["vision_cfg"]["width"] == 128


def test_unknown_name():
    with pytest.raises(RSSQAError, match="unknown"):
        create_clip("rs-nonexistent")


def test_export_loads_in_open_clip_with_identical_embeddings(tiny, images, tmp_path):
    model, tokenizer = tiny
    out = export_clip(model, "rs-tiny", tmp_path / "clip_rs")
    assert (out / CONFIG_FILE).is_file() and (out / WEIGHTS_FILE).is_file()
    ref_img, ref_txt = encode_images(model, images), encode_texts(model, tokenizer, TEXTS)

    oc_model, _, oc_val = open_clip.create_model_and_transforms("local-dir:" + str(out))
    oc_tok = open_clip.get_tokenizer("local-dir:" + str(out))
    assert torch.equal(encode_images(oc_model, images), ref_img)
    assert torch.equal(encode_texts(oc_model, oc_tok, TEXTS), ref_txt)
    # open_clip's own path (PIL preprocessing, its encode_image) agrees with ours on a 64 px image
    from PIL import Image

    oc_model.eval()
    with torch.no_grad():
        x = torch.stack([oc_val(Image.fromarray(im)) for im in images])
        theirs = torch.nn.functional.normalize(oc_model.encode_image(x), dim=-1)
    assert torch.allclose(theirs, ref_img, atol=1e-4)

    for loaded in (load_clip(out), create_clip("rs-tiny", checkpoint=out)):
        assert torch.equal(encode_images(loaded[0], images), ref_img)
        assert torch.equal(encode_texts(loaded[0], loaded[3], TEXTS), ref_txt)


def test_state_dict_files_and_lightning_prefix(tiny, images, tmp_path):
    model, _ = tiny
    ref = encode_images(model, images)
    sd = model.state_dict()
    torch.save(sd, tmp_path / "w.pt")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, tmp_path / "task.ckpt")
    for name in ("w.pt", "w.safetensors", "task.ckpt"):
        loaded = create_clip("rs-tiny", checkpoint=tmp_path / name)[0]
        assert torch.equal(encode_images(loaded, images), ref), name


def test_missing_checkpoint(tmp_path):
    with pytest.raises(RSSQAError, match="nope.pt: checkpoint not found"):
        create_clip("rs-tiny", checkpoint=tmp_path / "nope.pt")


def test_checkpoint_of_another_config_is_refused(tiny, tmp_path):
    model, _ = tiny
    small = create_clip("rs-small")[0]
    torch.save(small.state_dict(), tmp_path / "small.pt")
    with pytest.raises(
        RSSQAError, match=r"small\.pt: does not match the model config: .*differ in shape"
    ) as e:
        create_clip("rs-tiny", checkpoint=tmp_path / "small.pt")
    assert "\n" not in str(e.value)

    out = export_clip(small, "rs-small", tmp_path / "small_dir")
    with pytest.raises(
        RSSQAError, match=r"open_clip_config.json: does not match model config 'rs-tiny': embed_dim"
    ):
        create_clip("rs-tiny", checkpoint=out)

    # right config, wrong weights: config edited to claim rs-tiny
    cfg = json.loads((out / CONFIG_FILE).read_text())
    cfg["model_cfg"] = open_clip.get_model_config("rs-tiny")
    (out / CONFIG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(RSSQAError, match=r"open_clip_model.safetensors: does not match the model config"):
        load_clip(out)

    partial = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
    torch.save(partial, tmp_path / "partial.pt")
    with pytest.raises(RSSQAError, match=r"partial\.pt: .*missing \(first: visual\."):
        create_clip("rs-tiny", checkpoint=tmp_path / "partial.pt")


def test_corrupt_and_misplaced_checkpoints(tmp_path):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RSSQAError, match="bad.pt: unreadable checkpoint"):
        create_clip("rs-tiny", checkpoint=tmp_path / "bad.pt")
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(RSSQAError, match="unknown checkpoint type"):
        create_clip("rs-tiny", checkpoint=tmp_path / "weights.txt")
    with pytest.raises(RSSQAError, match="open_clip_config.json: not found"):
        load_clip(tmp_path)


def test_encoders_are_batch_invariant_and_normalised(tiny, images):
    model, tokenizer = tiny
    together = encode_images(model, images, batch_size=4)
    alone = torch.cat([encode_images(model, images[i : i + 1], batch_size=4) for i in range(len(images))])
    shuffled = encode_images(model, images[[3, 0, 4, 1, 2]], batch_size=4)
    assert together.dtype == torch.float32 and together.shape == (5, 128)
    assert torch.equal(together, alone)
    assert torch.equal(together[[3, 0, 4, 1, 2]], shuffled)
    assert torch.allclose(together.norm(dim=-1), torch.ones(5))
    txt = encode_texts(model, tokenizer, TEXTS, batch_size=4)
    assert torch.equal(txt[1], encode_texts(model, tokenizer, [TEXTS[1]], batch_size=4)[0])
    assert model.training  # the helpers restore the mode they found


def test_input_layouts(tiny, images):
    model, _ = tiny
    nhwc = to_model_input(model, images)
    nchw = to_model_input(model, torch.from_numpy(images).permute(0, 3, 1, 2))
    assert nhwc.shape == (5, 3, 64, 64) and torch.equal(nhwc, nchw)
    assert torch.equal(to_model_input(model, list(images)), nhwc)
    big = np.repeat(np.repeat(images, 2, axis=1), 2, axis=2)  # 128 px: resized to 64
    assert to_model_input(model, big).shape == (5, 3, 64, 64)
    with pytest.raises(RSSQAError, match="3 channels"):
        to_model_input(model, np.zeros((1, 4, 8, 8), np.uint8))
