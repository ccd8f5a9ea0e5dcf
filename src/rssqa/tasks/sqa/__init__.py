"""Stage sqa: train RS-SQA on RS-SQED, compare it with label-free baselines and ablations, recommend.

:class:`~rssqa.tasks.sqa.data.SQADataModule` turns an RS-SQED folder into model inputs once: the
frozen CLIP-RS features of every pool image (cached under the run folder, keyed by the weights), and
the method-agnostic segmentation inputs of every (image, method) row, both through
:mod:`rssqa.models.quality_inputs`. :class:`~rssqa.tasks.sqa.task.SQATask` trains the quality head
with the configured loss terms; the model is selected on validation SRCC.
:func:`~rssqa.tasks.sqa.run.run_sqa` trains RS-SQA and its ablations in one run under the same seed,
scores the label-free baselines on the same test rows, evaluates recommendation, draws the figures
(:mod:`~rssqa.tasks.sqa.figures`), trains and tests the pixel error head
(:mod:`~rssqa.tasks.sqa.pixel`), exports the deployable scorer (:mod:`~rssqa.tasks.sqa.export`)
and writes ``summary.json`` last.
"""

from rssqa.tasks.sqa.data import ImageBatchSampler, RowDataset, SQADataModule, clip_features_for
from rssqa.tasks.sqa.export import export_scorer
from rssqa.tasks.sqa.fits import FitJob, Fits, TrainerRecipe, fit_one
from rssqa.tasks.sqa.run import ABLATIONS, BASELINE_KEYS, SUMMARY_METRICS, run_sqa
from rssqa.tasks.sqa.task import SQATask, set_input_stats

__all__ = [
    "ABLATIONS",
    "BASELINE_KEYS",
    "SUMMARY_METRICS",
    "FitJob",
    "Fits",
    "ImageBatchSampler",
    "RowDataset",
    "SQADataModule",
    "SQATask",
    "TrainerRecipe",
    "clip_features_for",
    "export_scorer",
    "fit_one",
    "run_sqa",
    "set_input_stats",
]
