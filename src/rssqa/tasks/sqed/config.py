"""The sqed stage's configuration: its sources, how the methods train, what labelling caches.

Plain dataclasses, filled from ``conf/<profile>/sqed.yaml``: :class:`SQEDConfig` holds the sources
(:class:`SourceConfig`), the methods and their overrides, the splits and seed, and the training
(:class:`TrainConfig`) and labelling (:class:`LabelConfig`) settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class SourceConfig:
    """One segmentation source.

    Attributes:
        name: the source's name in the table.
        root: its folder; relative paths are resolved against the stage's ``data_root``.
        layout: registered layout (``rssqa.data.segsets.list_layouts()``); default ``name``.
        options: the layout's options (``patch_size``, ``palette``, ``unknown``, ``max_images``, ``scale``,
            ``group_pattern``, ``ignore_classes``, ...; see ``rssqa.data.segsets.SegSource``).
    """

    name: str
    root: str
    layout: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    """How the methods are trained.

    Attributes:
        epochs: the profile's epoch budget; a method trains ``round(epochs * epochs_scale)`` epochs.
        batch_size: images per batch.
        num_workers: DataLoader workers.
        augment: random flips and right-angle rotations.
        in_memory: hold the training images in memory (else read them from disk each epoch).
        save_last: keep a resumable checkpoint after every epoch (long runs; costs disk time).
        accelerator: Lightning accelerator.
    """

    epochs: int = 4
    batch_size: int = 16
    num_workers: int = 0
    augment: bool = True
    in_memory: bool = True
    save_last: bool = False
    accelerator: str = "cpu"


@dataclass
class LabelConfig:
    """What is cached per (image, method).

    Attributes:
        grid: side of the pooled feature and probability-map grid.
        hist_bins: bins of the confidence, certainty and margin histograms.
        batch_size: images per prediction batch.
        chunk: segmenter forward batch inside a prediction batch (zero-padded to it), so an image's
            statistics do not depend on its neighbours; part of the numerics: the scorer reads it
            from the shards and runs the methods with the same.
    """

    grid: int = 4
    hist_bins: int = 20
    batch_size: int = 32
    chunk: int = 16


@dataclass
class SQEDConfig:
    """The sqed stage.

    Attributes:
        sources: the segmentation sources.
        methods: registered method names (default all eight).
        method_configs: extra method JSON files to register first.
        size: method size (``tiny``, ``base``).
        method_overrides: method -> overrides (``encoder_name``, ``lr``, ``epochs_scale``, smp arguments).
        splits: share of each source's images (by split group) per split; ``seg`` trains the methods,
            the rest is RS-SQED.
        seed: the seed of splits and training.
        on_bad: ``error`` (stop at the first bad file) or ``skip`` (skip and count).
        train: training settings.
        label: labelling settings.
        wandb: ``offline``, ``online`` or ``disabled``.
        threads: torch CPU threads (0: leave torch's default).
    """

    sources: list[SourceConfig]
    methods: list[str] = field(default_factory=list)
    method_configs: list[str] = field(default_factory=list)
    size: str = "tiny"
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    splits: dict[str, float] = field(
        default_factory=lambda: {"seg": 0.4, "train": 0.36, "val": 0.12, "test": 0.12}
    )
    seed: int = 0
    on_bad: str = "error"
    train: TrainConfig = field(default_factory=TrainConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    wandb: str = "offline"
    threads: int = 0
