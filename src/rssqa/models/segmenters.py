"""The segmentation methods: a registry of named configurations over segmentation-models-pytorch.

A method is data (``rssqa/configs/segmenters/<name>.json``): an smp architecture, an encoder and
decoder per size (``tiny`` for the smoke and demo profiles, ``base`` for real data), a training recipe
(learning rate, weight decay, a share of the profile's epoch budget) and the intermediate layers that
RS-SQA reads. :func:`list_methods`, :func:`get_method_config`, :func:`add_method_config` and
:func:`resolve_method` work like open_clip's model registry; :class:`Segmenter` builds one with
``smp.create_model``.

:meth:`Segmenter.describe` is the one place where a segmentation is turned into what quality
assessment reads: the intermediate features (forward hooks, average-pooled to a fixed grid) and the
statistics of the probability map. The RS-SQED cache and ``rssqa score`` both call it.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torch import nn

from rssqa import baselines
from rssqa.errors import RSSQAError

SIZES = ("tiny", "base")
# Channel statistics of natural RGB images (the convention timm and smp encoders are trained with).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAP_NAMES = ("max_prob", "certainty", "margin")

_REGISTRY: dict[str, dict[str, Any]] = {}


def _load_builtin() -> None:
    folder = resources.files("rssqa") / "configs" / "segmenters"
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            _REGISTRY[entry.name[:-5]] = json.loads(entry.read_text())


def list_methods() -> list[str]:
    """Names of the registered methods, sorted."""
    return sorted(_REGISTRY)


def get_method_config(name: str) -> dict[str, Any]:
    """A copy of method ``name``'s configuration."""
    if name not in _REGISTRY:
        raise RSSQAError(f"method {name!r} unknown; choose from {list_methods()}")
    return copy.deepcopy(_REGISTRY[name])


def add_method_config(path_or_name: str | Path, config: Mapping[str, Any] | None = None) -> str:
    """Register a method from a JSON file, or from a name and a configuration dict.

    Returns:
        The method's name (a file's stem).
    """
    if config is None:
        path = Path(path_or_name)
        try:
            config = json.loads(path.read_text())
        except FileNotFoundError:
            raise RSSQAError(f"{path}: method config not found") from None
        except json.JSONDecodeError as e:
            raise RSSQAError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        name = path.stem
    else:
        name = str(path_or_name)
    for key in ("arch", "sizes", "features"):
        if key not in config:
            raise RSSQAError(f"method {name!r}: config lacks {key!r}")
    _REGISTRY[name] = copy.deepcopy(dict(config))
    return name


@dataclass(frozen=True)
class MethodSpec:
    """One method at one size, ready to build.

    Attributes:
        name: registry name.
        arch: smp architecture name (``smp.create_model``).
        encoder_name: smp / timm encoder.
        model_kwargs: further ``smp.create_model`` arguments (decoder widths, depth, ...).
        features: layer name -> ``{"module": dotted submodule path, "index": list element or absent}``.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        epochs_scale: this method's share of the profile's epoch budget.
        encoder_weights_path: optional local file of encoder weights (nothing is downloaded).
        description: one line on what the method is.
    """

    name: str
    arch: str
    encoder_name: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    features: dict[str, dict[str, Any]] = field(default_factory=dict)
    lr: float = 1e-3
    weight_decay: float = 1e-4
    epochs_scale: float = 1.0
    encoder_weights_path: str | None = None
    description: str = ""

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON form (stored in checkpoints, so a checkpoint rebuilds without the registry)."""
        return asdict(self)

    def epochs(self, budget: int) -> int:
        """This method's epochs out of a profile budget of ``budget`` (at least one)."""
        return max(1, round(budget * self.epochs_scale))


# override keys that are part of the recipe, not arguments of smp.create_model
_TRAIN_KEYS = {"lr", "weight_decay", "epochs_scale", "encoder_weights_path", "features"}


def resolve_method(name: str, size: str = "tiny", overrides: Mapping[str, Any] | None = None) -> MethodSpec:
    """Method ``name`` at ``size``, with ``overrides`` applied.

    Args:
        name: a registered method.
        size: a key of the method's ``sizes`` (``tiny``, ``base``).
        overrides: ``encoder_name``, ``lr``, ``weight_decay``, ``epochs_scale``, ``encoder_weights_path``,
            ``features``, or any ``smp.create_model`` argument.
    """
    cfg = get_method_config(name)
    if size not in cfg["sizes"]:
        raise RSSQAError(f"method {name!r}: no size {size!r}; it has {sorted(cfg['sizes'])}")
    ov = dict(overrides or {})
    kwargs = {**cfg["sizes"][size], **{k: v for k, v in ov.items() if k not in _TRAIN_KEYS}}
    train = {**cfg.get("train", {}), **{k: v for k, v in ov.items() if k in _TRAIN_KEYS}}
    encoder = kwargs.pop("encoder_name", None)
    if encoder is None:
        raise RSSQAError(f"method {name!r}: size {size!r} names no encoder_name")
    features = train.pop("features", None) or cfg["features"]
    return MethodSpec(
        name=name,
        arch=cfg["arch"],
        encoder_name=encoder,
        model_kwargs=kwargs,
        features=copy.deepcopy(features),
        lr=float(train.get("lr", 1e-3)),
        weight_decay=float(train.get("weight_decay", 1e-4)),
        epochs_scale=float(train.get("epochs_scale", 1.0)),
        encoder_weights_path=train.get("encoder_weights_path"),
        description=cfg.get("description", ""),
    )


def check_buildable(spec: MethodSpec) -> None:
    """Check, without building it, that smp knows the architecture and the encoder of ``spec``."""
    import timm

    if spec.arch.lower() not in {k.lower() for k in smp.MODEL_ARCHITECTURES_MAPPING}:
        raise RSSQAError(f"method {spec.name!r}: smp has no architecture {spec.arch!r}")
    name = spec.encoder_name
    known = timm.is_model(name[3:]) if name.startswith("tu-") else name in smp.encoders.encoders
    if not known:
        raise RSSQAError(f"method {spec.name!r}: smp/timm know no encoder {name!r}")
    if spec.encoder_weights_path and not Path(spec.encoder_weights_path).is_file():
        raise RSSQAError(f"{spec.encoder_weights_path}: encoder weights of method {spec.name!r} not found")


# ------------------------------------------------------------------------------------ statistics
def _hist01(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Per-row share of values in ``bins`` equal bins over [0, 1]: ``B×N`` -> ``B×bins``."""
    idx = (values * bins).long().clamp_(0, bins - 1)
    hist = torch.zeros(values.shape[0], bins, dtype=torch.float64, device=values.device)
    hist.scatter_add_(1, idx, torch.ones_like(values, dtype=torch.float64))
    return hist / values.shape[1]


def probability_statistics(
    probs: torch.Tensor, grid: int = 4, bins: int = 20, keep_pred: bool = False
) -> dict[str, torch.Tensor]:
    """What the label-free baselines and RS-SQA read off a probability map.

    Args:
        probs: ``B×C×H×W`` class probabilities (summing to 1 over ``C``).
        grid: side ``g`` of the pooled maps.
        bins: histogram bins ``K`` over [0, 1].
        keep_pred: also return ``pred``, the ``B×H×W`` arg-max class (computed anyway; what
            agreement between methods reads).

    Returns:
        ``msp``, ``entropy`` (``1 - mean H / log C``), ``margin``: ``B`` (as :mod:`rssqa.baselines`);
        ``hist_conf`` (max probability, the ATC input), ``hist_certainty`` (``1 - H / log C``),
        ``hist_margin``: ``B×K`` shares of pixels; ``maps``: ``B×3×g×g`` average-pooled max
        probability, certainty and margin; ``class_share``: ``B×C`` share of pixels predicted as each
        class; ``mean_prob``: ``B×C`` mean probability of each class.
    """
    # per-pixel work in the maps' own precision (float32 from a softmax: half the memory traffic of
    # float64, the same histograms to a pixel in 10^4); every mean over pixels accumulates in float64
    p = probs if probs.is_floating_point() else probs.float()
    b, c = p.shape[:2]
    # one pass each for the top two probabilities and the entropy, shared by every statistic below
    conf, second, pred = baselines.top2(p)
    margin = conf - second
    h = torch.special.entr(p).sum(1)  # -p log p, 0 where p = 0
    certainty = 1.0 - h / math.log(c)
    maps = torch.stack([conf, certainty, margin], 1)
    pred = pred.flatten(1)
    share = torch.zeros(b, c, dtype=torch.float64, device=p.device)
    share.scatter_add_(1, pred, torch.ones_like(pred, dtype=torch.float64))

    def image_mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(-2, -1), dtype=torch.float64)

    out = {
        "msp": image_mean(conf),
        "entropy": 1.0 - image_mean(h) / math.log(c),
        "margin": image_mean(margin),
        "hist_conf": _hist01(conf.flatten(1), bins),
        "hist_certainty": _hist01(certainty.flatten(1).clamp(0, 1), bins),
        "hist_margin": _hist01(margin.flatten(1), bins),
        "maps": F.adaptive_avg_pool2d(maps, grid).double(),
        "class_share": share / pred.shape[1],
        "mean_prob": image_mean(p),
    }
    if keep_pred:
        out["pred"] = pred.view(b, *p.shape[2:])
    return out


# --------------------------------------------------------------------------------------- module
class Segmenter(nn.Module):
    """One segmentation method: an smp model with input normalisation and feature hooks.

    Args:
        spec: the method (:func:`resolve_method`).
        num_classes: output classes ``C``.
        grid: side ``g`` of the pooled feature grid.
        hist_bins: histogram bins of :func:`probability_statistics`.
        load_weights: load ``spec.encoder_weights_path`` (off when a checkpoint will overwrite them).

    ``forward`` takes ``B×3×H×W`` images in [0, 1] of any size (padded inside to a multiple of the
    encoder's stride, at least two strides, the logits cropped back) and returns ``B×C×H×W`` logits.
    """

    def __init__(
        self,
        spec: MethodSpec,
        num_classes: int,
        grid: int = 4,
        hist_bins: int = 20,
        load_weights: bool = True,
    ):
        super().__init__()
        self.spec, self.num_classes, self.grid, self.hist_bins = spec, num_classes, grid, hist_bins
        try:
            self.model = smp.create_model(
                spec.arch,
                encoder_name=spec.encoder_name,
                encoder_weights=None,
                classes=num_classes,
                **spec.model_kwargs,
            )
        except (KeyError, ValueError, TypeError) as e:
            raise RSSQAError(
                f"method {spec.name!r}: smp cannot build {spec.arch}/{spec.encoder_name}: {e}"
            ) from None
        if spec.encoder_weights_path and load_weights:
            load_encoder_weights(self.model.encoder, spec.encoder_weights_path)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)
        self.stride = int(getattr(self.model.encoder, "output_stride", 32))
        self._captured: dict[str, torch.Tensor] | None = None
        for layer, where in spec.features.items():
            try:
                module = self.model.get_submodule(where["module"])
            except AttributeError:
                raise RSSQAError(
                    f"method {spec.name!r}: feature {layer!r}: no module {where['module']!r}"
                ) from None
            module.register_forward_hook(self._hook(layer, where.get("index")))

    def _hook(self, layer: str, index: int | None):
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if self._captured is not None:
                out = output[index] if index is not None else output
                self._captured[layer] = F.adaptive_avg_pool2d(out.float(), self.grid)

        return hook

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise RSSQAError(
                f"method {self.spec.name!r}: expected images B x 3 x H x W, got {tuple(images.shape)}"
            )
        h, w = images.shape[-2:]
        x = (images - self.mean) / self.std
        # pad to a multiple of the encoder's stride, and to at least two cells of it: some decoders
        # normalise over the deepest map and fail on a single cell
        ph, pw = max(-h % self.stride, 2 * self.stride - h), max(-w % self.stride, 2 * self.stride - w)
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        return self.model(x)[..., :h, :w]

    @torch.no_grad()
    def describe(self, images: torch.Tensor, keep_probs: bool = False) -> dict[str, torch.Tensor]:
        """Segment and summarise.

        Args:
            images: ``B×3×H×W`` in [0, 1].
            keep_probs: also return ``probs`` (the softmax, ``B×C×H×W``) and ``pred`` (its arg-max,
                ``B×H×W``): what agreement between methods reads, computed here anyway.

        Returns:
            ``logits`` ``B×C×H×W``; ``feat/<layer>`` ``B×C_l×g×g`` for each configured layer; and the
            :func:`probability_statistics` of the softmax.
        """
        self._captured = {}
        try:
            logits = self(images)
            feats = {f"feat/{k}": v for k, v in self._captured.items()}
        finally:
            self._captured = None
        missing = set(self.spec.features) - {k[5:] for k in feats}
        if missing:
            raise RSSQAError(f"method {self.spec.name!r}: layers {sorted(missing)} produced no output")
        probs = logits.float().softmax(1)
        stats = probability_statistics(probs, self.grid, self.hist_bins, keep_pred=keep_probs)
        return {"logits": logits, **feats, **stats, **({"probs": probs} if keep_probs else {})}

    def feature_shapes(self, image_size: int = 64) -> dict[str, tuple[int, ...]]:
        """Shape of each cached quantity for one image (a dry run on zeros), without the batch axis."""
        was = self.training
        self.eval()
        out = self.describe(torch.zeros(1, 3, image_size, image_size, device=self.mean.device))
        self.train(was)
        return {k: tuple(v.shape[1:]) for k, v in out.items() if k != "logits"}


def build_segmenter(
    name: str,
    num_classes: int,
    size: str = "tiny",
    overrides: Mapping[str, Any] | None = None,
    grid: int = 4,
    hist_bins: int = 20,
) -> Segmenter:
    """Build method ``name`` (untrained) with ``num_classes`` outputs."""
    return Segmenter(resolve_method(name, size, overrides), num_classes, grid, hist_bins)


def load_segmenter(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Segmenter:
    """The trained :class:`Segmenter` of a sqed checkpoint (``methods/<source>/<method>/final.ckpt``), on
    ``map_location``, in eval mode.

    Reads the Lightning checkpoint's hyper-parameters and weights directly, so scoring needs no
    training code. The checkpoint holds every weight: the encoder's initial weights file is not read.

    Raises:
        RSSQAError: a missing file, or one that is not a sqed segmenter checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise RSSQAError(f"{path}: segmenter checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hp, state = ckpt["hyper_parameters"], ckpt["state_dict"]
        seg = Segmenter(MethodSpec(**hp["spec"]), hp["num_classes"], hp["grid"], hp["hist_bins"], load_weights=False)
        prefix = "segmenter."
        seg.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    except RSSQAError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.load and a foreign dict raise many kinds; all mean "not ours"
        raise RSSQAError(f"{path}: not a sqed segmenter checkpoint ({type(e).__name__}: {e})") from None
    return seg.to(map_location).eval()


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load local encoder weights (``.safetensors``, or a torch file holding a state dict).

    Keys may carry an ``encoder.`` prefix (a whole smp model's state dict) or lack the ``model.``
    prefix smp's timm wrapper adds; the variant matching most keys is used.
    """
    path = Path(path)
    if not path.is_file():
        raise RSSQAError(f"{path}: encoder weights not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
    except Exception as e:  # noqa: BLE001 - any unreadable file is one user error
        raise RSSQAError(f"{path}: unreadable weights ({type(e).__name__}: {e})") from None
    own = encoder.state_dict()
    candidates = []
    for strip in ("", "encoder."):
        for add in ("", "model."):
            cand = {add + k[len(strip) :]: v for k, v in state.items() if k.startswith(strip)}
            hits = {k: v for k, v in cand.items() if k in own and own[k].shape == v.shape}
            candidates.append(hits)
    best = max(candidates, key=len)
    if not best:
        raise RSSQAError(f"{path}: no tensor matches the encoder's weights (wrong file or encoder)")
    encoder.load_state_dict(best, strict=False)


_load_builtin()
