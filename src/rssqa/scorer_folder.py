"""A scorer folder's files: what the sqa stage writes (:mod:`rssqa.tasks.sqa.export`) and
:class:`rssqa.scorer.Scorer` reads.

``scorer.json`` (:data:`CONFIG`) holds every head's arguments, the CLIP it was trained with and the methods'
checkpoints; each head's weights are a safetensors file of their own. Reading any of them fails with one line
naming the file and what was wrong.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from rssqa.errors import RSSQAError
from rssqa.models.pixel_error import PixelErrorHead
from rssqa.models.pixel_error import load_pixel_head as _pixel_head
from rssqa.models.sqa import RSSQA
from rssqa.runs import read_json

CONFIG = "scorer.json"
WEIGHTS = "scorer.safetensors"
AGREEMENT_WEIGHTS = "scorer_agreement.safetensors"  # RS-SQA with agreement between methods, when trained
RANKING_WEIGHTS = "scorer_ranking.safetensors"  # the same trained for ranking methods (recommendation)
PIXEL_WEIGHTS = "scorer_pixel.safetensors"  # the pixel error head, when trained
FORMAT = 1


def load_head(kwargs: dict[str, Any], weights: Path, config: Path) -> RSSQA:
    """A quality head from its arguments and weights file, or a one-line error naming the file."""
    model = RSSQA(**kwargs)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except FileNotFoundError:
        raise RSSQAError(f"{weights}: scorer weights not found") from None
    except (RuntimeError, OSError) as e:
        raise RSSQAError(f"{weights}: does not fit {config} ({str(e).splitlines()[0][:160]})") from None
    return model


def load_pixel_head(kwargs: dict[str, Any], weights: Path) -> PixelErrorHead:
    """The pixel error head from its arguments and weights file, or a one-line error naming the file."""
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise RSSQAError(f"{weights}: pixel error head weights not found") from None
    except (RuntimeError, OSError) as e:
        raise RSSQAError(f"{weights}: not readable ({str(e).splitlines()[0][:160]})") from None
    return _pixel_head(kwargs, state, str(weights))


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``scorer.json`` of a scorer folder, or a one-line error naming the file."""
    return read_json(Path(folder) / CONFIG, "scorer config not found (a scorer folder is written by the sqa stage)", "not a scorer config")
