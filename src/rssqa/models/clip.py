"""CLIP models by name: build, load from local checkpoints, export, and encode images and texts.

Model sizes are data, not code: ``src/rssqa/configs/clip/*.json`` are open_clip model configs
(``rs-tiny`` for the smoke profile, ``rs-small`` for the demo profile) registered into open_clip's
registry with :func:`open_clip.add_model_config`; the paper profile uses open_clip's own ``ViT-B-32`` and
``ViT-L-14``. Every open_clip name works.

Weights enter as local files only: an open_clip local directory (``open_clip_config.json`` +
``open_clip_model.safetensors``, what :func:`export_clip` writes and what RemoteCLIP / GeoRSCLIP style
releases look like once downloaded), or a bare state dict (``.pt``, ``.pth``, ``.bin``, ``.safetensors``,
or a Lightning ``.ckpt`` of :class:`rssqa.tasks.pretrain.PretrainTask`). A file that does not fit the
model is refused with a one-line :class:`~rssqa.errors.RSSQAError` naming the file and the mismatch;
nothing is resized or partially loaded behind the user's back.

Example:
    >>> model, _, _, tokenizer = create_clip("rs-tiny")                       # doctest: +SKIP
    >>> img = encode_images(model, images_uint8_nhwc)                         # doctest: +SKIP
    >>> txt = encode_texts(model, tokenizer, ["an aerial image of a forest"])  # doctest: +SKIP
    >>> (img @ txt.T).shape                                                   # doctest: +SKIP
    torch.Size([N, 1])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from rssqa.errors import RSSQAError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")

Tokenizer = Callable[..., torch.Tensor]


def _register() -> None:
    # idempotent: open_clip keeps a list of config paths and rescans all of them on each call
    if not set(_our_names()) <= set(open_clip.list_models()):
        open_clip.add_model_config(CONFIG_DIR)


def _our_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


_register()


def list_clip_models() -> list[str]:
    """Names :func:`create_clip` accepts: ours (``rs-*``) first, then open_clip's built-in ones."""
    ours = _our_names()
    return ours + [n for n in open_clip.list_models() if n not in ours]


def clip_config(name: str) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``) registered as ``name``."""
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise RSSQAError(
            f"clip model {name!r}: unknown; choose one of {', '.join(_our_names())} or an open_clip name"
        )
    return cfg


def create_clip(
    name: str, checkpoint: str | os.PathLike | None = None, **kw: Any
) -> tuple[torch.nn.Module, Callable, Callable, Tokenizer]:
    """Build a CLIP model by registered name, randomly initialised or from a local checkpoint.

    Args:
        name: a name from :func:`list_clip_models` (``"rs-tiny"``, ``"rs-small"``, ``"ViT-B-32"``, ...).
        checkpoint: optional local weights: an open_clip local directory (its config must equal the
            config of ``name``) or a state-dict file (``.safetensors``, ``.pt``, ``.pth``, ``.bin``, ``.ckpt``).
        **kw: passed to :func:`open_clip.create_model_and_transforms` (``device``, ``precision``,
            ``aug_cfg``, ``force_image_size``, ...).

    Returns:
        ``(model, preprocess_train, preprocess_val, tokenizer)``; the preprocessors are open_clip's PIL
        transforms, the tokenizer maps a list of ``B`` strings to ``B×context_length`` int64 tokens. The
        model is in train mode, as open_clip returns it.

    Raises:
        RSSQAError: unknown name, missing checkpoint, or a checkpoint that does not match the config.
    """
    cfg = clip_config(name)
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.exists():
            raise RSSQAError(f"{checkpoint}: checkpoint not found")
        if checkpoint.is_dir():
            _check_config_matches(checkpoint / CONFIG_FILE, cfg, name)
    with quiet_weight_notice():
        model, pre_train, pre_val = open_clip.create_model_and_transforms(name, pretrained=None, **kw)
    model.rssqa_model_cfg = _effective_config(cfg, kw)
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model, pre_train, pre_val, open_clip.get_tokenizer(name)


class _DropNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded for model")


@contextlib.contextmanager
def quiet_weight_notice() -> Iterator[None]:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" while creating a model
    whose weights are loaded right after (or that is meant to start from scratch)."""
    root, drop = logging.getLogger(), _DropNotice()
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)


def load_clip(path: str | os.PathLike, **kw: Any) -> tuple[torch.nn.Module, Callable, Callable, Tokenizer]:
    """Load a model from an open_clip local directory (what :func:`export_clip` writes).

    Args:
        path: a directory with ``open_clip_config.json`` and the weights (``open_clip_model.safetensors``
            or another single state-dict file).
        **kw: passed to :func:`open_clip.create_model_and_transforms`.

    Returns:
        ``(model, preprocess_train, preprocess_val, tokenizer)`` as :func:`create_clip`.
    """
    path = Path(path)
    config_path = path / CONFIG_FILE
    if not path.is_dir():
        raise RSSQAError(f"{path}: not a directory (expected an open_clip local dir with {CONFIG_FILE})")
    cfg = _read_config(config_path)
    ident = "local-dir:" + str(path)
    with quiet_weight_notice():  # the weights are loaded (strictly) right below
        model, pre_train, pre_val = open_clip.create_model_and_transforms(ident, load_weights=False, **kw)
    model.rssqa_model_cfg = _effective_config(cfg, kw)
    load_weights(model, path)
    return model, pre_train, pre_val, open_clip.get_tokenizer(ident)


def load_weights(model: torch.nn.Module, checkpoint: str | os.PathLike) -> Path:
    """Load a local checkpoint into ``model`` strictly, or raise a one-line error.

    Args:
        model: an open_clip model.
        checkpoint: an open_clip local directory or a state-dict file; Lightning checkpoints of the
            pretrain task (keys prefixed ``model.``) are accepted too.

    Returns:
        The weights file that was read.
    """
    path = _weights_file(Path(checkpoint))
    try:
        state = open_clip.factory.load_state_dict(str(path))
    except Exception as e:  # torch / safetensors raise many types for a bad file
        raise RSSQAError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(state, dict) or not state:
        raise RSSQAError(f"{path}: not a state dict")
    if all(k.startswith("model.") for k in state):
        state = {k[len("model.") :]: v for k, v in state.items()}
    problem = _state_mismatch(model, state)
    if problem:
        raise RSSQAError(f"{path}: does not match the model config: {problem}")
    model.load_state_dict(state, strict=True)
    return path


def export_clip(
    model: torch.nn.Module,
    model_name: str,
    out_dir: str | os.PathLike,
    tokenizer: Any | None = None,
) -> Path:
    """Write ``model`` in open_clip's local-dir format, atomically (the folder appears complete or not at all).

    The result loads with ``open_clip.create_model_and_transforms("local-dir:" + out_dir)`` and with
    :func:`load_clip`.

    Args:
        model: an open_clip model (unwrapped; not a LightningModule).
        model_name: the registered name it was built from (recorded; its config is used when the model
            does not carry the config it was built with).
        out_dir: destination directory; replaced if it exists.
        tokenizer: saved alongside when it is a Hugging Face tokenizer (open_clip's default BPE
            tokenizer needs no files).

    Returns:
        ``out_dir`` as a Path.
    """
    out_dir = Path(out_dir)
    cfg = deepcopy(getattr(model, "rssqa_model_cfg", None) or clip_config(model_name))
    pp = dict(getattr(model.visual, "preprocess_cfg", {}))
    preprocess_cfg = {k: pp[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pp}
    config = {"model_name": model_name, "model_cfg": cfg, "preprocess_cfg": preprocess_cfg}
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / WEIGHTS_FILE))
    (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp))
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


# ------------------------------------------------------------------------------------------------ encoding
def clip_fingerprint(clip: torch.nn.Module) -> str:
    """SHA-1 over the names, shapes and bytes of a model's weights: which CLIP a scorer was made for."""
    h = hashlib.sha1()
    for name, t in sorted(clip.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def image_size(model: torch.nn.Module) -> int:
    """Side in pixels of the square images the model's visual tower takes."""
    size = model.visual.image_size
    return int(size[0] if isinstance(size, tuple | list) else size)


def context_length(model: torch.nn.Module) -> int:
    """Number of text tokens the model takes."""
    return int(model.context_length)


@dataclass(frozen=True)
class InputSpec:
    """What a model takes: square images of ``image_size`` pixels normalised with ``mean`` / ``std``
    (per channel, pixels in [0, 1]), and captions through ``tokenizer`` (``B`` strings -> ``B×L`` int64)."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    tokenizer: Tokenizer


def input_spec(model: torch.nn.Module, tokenizer: Tokenizer) -> InputSpec:
    """The :class:`InputSpec` of an open_clip model and its tokenizer."""
    mean = tuple(model.visual.image_mean or open_clip.OPENAI_DATASET_MEAN)
    std = tuple(model.visual.image_std or open_clip.OPENAI_DATASET_STD)
    return InputSpec(image_size(model), mean, std, tokenizer)  # type: ignore[arg-type]


def normalise_pixels(x: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 pixels ``B×H×W×3`` or ``B×3×H×W`` -> normalised float32 ``B×3×size×size`` on the same device.

    Resizing (only when the side differs) is bilinear with antialiasing and squashes the aspect ratio;
    crop first to keep it.
    """
    if x.ndim != 4:
        raise RSSQAError(f"images: expected 4 dimensions (B×H×W×3 or B×3×H×W), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        raise RSSQAError(f"images: expected uint8 pixels or preprocessed floats, got {x.dtype}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] != 3:
        raise RSSQAError(f"images: expected 3 channels, got shape {tuple(x.shape)}")
    x = x.float() / 255.0
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False).clamp_(
            0, 1
        )
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous()


def to_model_input(
    model: torch.nn.Module, images: np.ndarray | torch.Tensor | Sequence[np.ndarray]
) -> torch.Tensor:
    """Turn raw pixels into the normalised ``B×3×S×S`` float32 batch the model takes (``S`` = image size).

    Args:
        images: uint8 pixels as a ``B×H×W×3`` array / tensor, a ``B×3×H×W`` uint8 tensor, or a list of
            ``H×W×3`` arrays of one size. Float tensors ``B×3×S×S`` are taken as already preprocessed.

    Returns:
        ``B×3×S×S`` float32 on the model's device (see :func:`normalise_pixels`).
    """
    device = next(model.parameters()).device
    if isinstance(images, list | tuple):
        images = np.stack([np.asarray(im) for im in images])
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    if x.is_floating_point():
        if x.ndim != 4 or x.shape[1] != 3:
            raise RSSQAError(f"images: float input must be preprocessed B×3×H×W, got shape {tuple(x.shape)}")
        return x.to(device=device, dtype=torch.float32)
    spec = input_spec(model, tokenizer=None)  # type: ignore[arg-type]
    return normalise_pixels(x.to(device), spec.image_size, spec.mean, spec.std)


@torch.no_grad()
def encode_images(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor | Sequence[np.ndarray],
    batch_size: int = 32,
) -> torch.Tensor:
    """Embed images: L2-normalised float32 features ``B×D`` on the CPU.

    Deterministic and batch-invariant: images run in chunks of exactly ``batch_size`` (the last one
    padded), so an image's features are bit-identical whether it is encoded alone or among others.

    Args:
        model: an open_clip model.
        images: anything :func:`to_model_input` takes.
        batch_size: chunk size; part of the numerics (keep it fixed where bit-identity matters).
    """
    x = to_model_input(model, images)
    return _chunked(model, x, lambda m, c: m.encode_image(c), batch_size)


@torch.no_grad()
def encode_texts(
    model: torch.nn.Module, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 64
) -> torch.Tensor:
    """Embed captions: L2-normalised float32 features ``B×D`` on the CPU (deterministic, batch-invariant).

    Args:
        model: an open_clip model.
        tokenizer: its tokenizer (from :func:`create_clip` / :func:`load_clip`).
        texts: ``B`` strings.
        batch_size: chunk size (see :func:`encode_images`).
    """
    device = next(model.parameters()).device
    tokens = tokenizer(list(texts)).to(device)
    return _chunked(model, tokens, lambda m, c: m.encode_text(c), batch_size)


def _chunked(model: torch.nn.Module, x: torch.Tensor, fn: Callable, batch_size: int) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        out = []
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            n = len(chunk)
            if n < batch_size:  # pad with zeros so every forward has the same shape
                chunk = torch.cat([chunk, chunk.new_zeros((batch_size - n, *chunk.shape[1:]))])
            feats = fn(model, chunk)[:n].float()
            out.append(F.normalize(feats, dim=-1).cpu())
        if not out:
            return torch.zeros((0, int(getattr(model.visual, "output_dim", 0))))
        return torch.cat(out)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------ checks
def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise RSSQAError(
            f"{path}: not found (an open_clip local dir needs {CONFIG_FILE} next to the weights)"
        )
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RSSQAError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "model_cfg" not in data:
        raise RSSQAError(f"{path}: missing 'model_cfg'")
    return data["model_cfg"]


def _check_config_matches(path: Path, cfg: dict[str, Any], name: str) -> None:
    diff = _first_difference(_read_config(path), cfg)
    if diff:
        raise RSSQAError(f"{path}: does not match model config {name!r}: {diff}")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            where = f"{prefix}.{key}" if prefix else key
            if key not in a or key not in b:
                return f"{where} is {a.get(key, '<absent>')!r} in the file, {b.get(key, '<absent>')!r} in the config"
            found = _first_difference(a[key], b[key], where)
            if found:
                return found
        return None
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        a, b = list(a), list(b)
    return None if a == b else f"{prefix} is {a!r} in the file, {b!r} in the config"


def _effective_config(cfg: dict[str, Any], kw: dict[str, Any]) -> dict[str, Any]:
    # the config the model was really built with, so that an export reloads the same architecture
    cfg = deepcopy(cfg)
    if kw.get("force_image_size") is not None:
        cfg["vision_cfg"]["image_size"] = kw["force_image_size"]
    if kw.get("force_context_length") is not None:
        cfg["text_cfg"]["context_length"] = kw["force_context_length"]
    if kw.get("force_quick_gelu"):
        cfg["quick_gelu"] = True
    return cfg


def _weights_file(path: Path) -> Path:
    if not path.exists():
        raise RSSQAError(f"{path}: checkpoint not found")
    if path.is_file():
        if path.suffix not in WEIGHT_SUFFIXES:
            raise RSSQAError(
                f"{path}: unknown checkpoint type {path.suffix!r} (expected {', '.join(WEIGHT_SUFFIXES)})"
            )
        return path
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    found = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        what = (
            "no weights file" if not found else f"several weights files ({', '.join(p.name for p in found)})"
        )
        raise RSSQAError(f"{path}: {what}; expected {WEIGHTS_FILE}")
    return found[0]


def _state_mismatch(model: torch.nn.Module, state: dict[str, Any]) -> str | None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} is {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensors differ in shape (first: {shapes[0]})")
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
    return "; ".join(parts) or None
