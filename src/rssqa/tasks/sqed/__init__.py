"""Stage sqed: train the segmentation methods on each source, label the pool, write RS-SQED.

For every source: check its samples and split its images (``seg`` trains the methods; the rest, the
pool, is RS-SQED's ``train``/``val``/``test``). For every (source, method), a *unit*: train with a
Lightning ``Trainer`` (seeded per unit, so a resumed run gives the numbers of an uninterrupted one),
then label every pool image with its OA and cached statistics, as one label shard. Checkpoints and
shards carry a fingerprint of everything they depend on; a rerun reuses those that match.

Many ranks, one code path: a cluster run starts the same command ``W`` times, each process builds the
units :func:`assign_units` gives it (from :meth:`Ranks.from_env`), and rank 0 waits for the others'
units and writes the shared files (pools, ``splits.json``, the table, the summary) and the W&B log. A
one-process run is the case ``W = 1``.

Modules: :mod:`~rssqa.tasks.sqed.config` (configuration), :mod:`~rssqa.tasks.sqed.task` (the
Lightning task), :mod:`~rssqa.tasks.sqed.ranks` (ranks and unit assignment),
:mod:`~rssqa.tasks.sqed.sources` (prepared sources and fingerprints), :mod:`~rssqa.tasks.sqed.train`
and :mod:`~rssqa.tasks.sqed.label` (one unit), :mod:`~rssqa.tasks.sqed.build` (the stage).
"""

from rssqa.models.segmenters import load_segmenter
from rssqa.tasks.sqed.build import build_sqed, plan_sqed
from rssqa.tasks.sqed.config import LabelConfig, SourceConfig, SQEDConfig, TrainConfig
from rssqa.tasks.sqed.label import label_method
from rssqa.tasks.sqed.ranks import Ranks, assign_units
from rssqa.tasks.sqed.ranks import _devices as _devices  # reached by the tests
from rssqa.tasks.sqed.sources import PreparedSource, prepare_source, training_data
from rssqa.tasks.sqed.task import SegmentationTask, load_task, per_image_oa, random_dihedral
from rssqa.tasks.sqed.train import _resume_point as _resume_point  # reached by the tests
from rssqa.tasks.sqed.train import train_method

__all__ = [
    "LabelConfig",
    "PreparedSource",
    "Ranks",
    "SQEDConfig",
    "SegmentationTask",
    "SourceConfig",
    "TrainConfig",
    "assign_units",
    "build_sqed",
    "label_method",
    "load_segmenter",
    "load_task",
    "per_image_oa",
    "plan_sqed",
    "prepare_source",
    "random_dihedral",
    "train_method",
    "training_data",
]
