"""Stage purify: a captioner-filter loop over WebDataset shards (in the manner of BLIP's CapFilt).

For every image-text pair of the coarse tier: cheap rules (:mod:`rssqa.data.caption_rules`) reject
captions no model needs to read; a filter CLIP (fitted on the trusted tier, or loaded) scores the pair;
a pair that breaks a rule or scores below the threshold goes to a CoCa captioner (fitted, or loaded),
whose caption is kept when it passes the rules and the filter (``rewritten``), else the sample is
``dropped``. The threshold is a fixed score, or set by a score pass over all input captions (a target
keep fraction, or Otsu's cut). Rounds repeat the loop, optionally refitting both models on the trusted
tier plus the kept pairs (bootstrapping).

Scoring and captioning run as Lightning prediction: DDP rank ``r`` owns the input shards ``i`` with
``i % world_size == r`` and writes, per input shard, an output shard and then a done-marker (both
atomically), so a killed run started again skips finished shards and ends with exactly the output of
an uninterrupted one.

Run-folder layout (``out_dir``)::

    shards/shard-000000.tar ... + sizes.json     purified pairs of the last round (one per input shard)
    done/shard-000000.json ...                   per input shard: counts + one record per sample
    rounds/<r>/{filter,captioner}/               models of round r (open_clip local-dir format)
    rounds/<r>/scores/, threshold.json           score pass (keep-fraction or Otsu threshold)
    rounds/<r>/shards, rounds/<r>/done           outputs of earlier rounds (bootstrapping)
    examples.csv, logs/, wandb/, summary.json    (summary last)

Modules: :mod:`~rssqa.tasks.purify.config` (settings, checks, building the models),
:mod:`~rssqa.tasks.purify.fit` (fitting them), :mod:`~rssqa.tasks.purify.data` (prediction data),
:mod:`~rssqa.tasks.purify.predict` (the prediction step), :mod:`~rssqa.tasks.purify.writers` (per-shard
outputs), :mod:`~rssqa.tasks.purify.rounds` (reading a round's results, thresholds),
:mod:`~rssqa.tasks.purify.loop` (the loop) and :mod:`~rssqa.tasks.purify.examples` (the examples table).
"""

from rssqa.tasks.purify.config import (
    FitConfig,
    ModelSpec,
    PurifyConfig,
    build_captioner,
    build_filter,
    captioner_context_length,
    check_settings,
    validate,
)
from rssqa.tasks.purify.data import PendingShards, SamplePrep, ShardBatches
from rssqa.tasks.purify.examples import DECISIONS, EXAMPLE_COLUMNS, example_rows, write_examples_csv
from rssqa.tasks.purify.fit import PairFit, pair_loader, sub_caption
from rssqa.tasks.purify.loop import Purify, already_done
from rssqa.tasks.purify.predict import PurifyTask
from rssqa.tasks.purify.rounds import (
    RoundDirs,
    account,
    keep_fraction_threshold,
    otsu_threshold,
    read_markers,
    read_scores,
    round_dirs,
)
from rssqa.tasks.purify.writers import PurifyWriter, ScoreWriter, shard_name

__all__ = [
    "DECISIONS",
    "EXAMPLE_COLUMNS",
    "FitConfig",
    "ModelSpec",
    "PairFit",
    "PendingShards",
    "Purify",
    "PurifyConfig",
    "PurifyTask",
    "PurifyWriter",
    "RoundDirs",
    "SamplePrep",
    "ScoreWriter",
    "ShardBatches",
    "account",
    "already_done",
    "build_captioner",
    "build_filter",
    "captioner_context_length",
    "check_settings",
    "example_rows",
    "keep_fraction_threshold",
    "otsu_threshold",
    "pair_loader",
    "read_markers",
    "read_scores",
    "round_dirs",
    "shard_name",
    "sub_caption",
    "validate",
    "write_examples_csv",
]
