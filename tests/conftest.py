"""Shared fixtures: the real configs, shrunk; a tiny world generated once per session."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rssqa.world import CorpusConfig, SourcesConfig, WorldConfig, generate_world  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# tests use tiny tensors: one thread avoids oversubscribing a small, shared CPU
torch.set_num_threads(1)


def stage_env() -> dict[str, str]:
    """The environment of the tests' stage subprocesses: this repository importable, offline, one thread
    each, no launcher's rank variables."""
    launcher = ("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "TORCHELASTIC")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONHASHSEED="0")
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@pytest.fixture(scope="session")
def stage_python():
    """``python``, for a stage subprocess run in :func:`stage_env`: a fork of one preloaded interpreter
    (``rssqa.preload``, the way ``make demo`` runs them) instead of a fresh one importing torch,
    Lightning and open_clip again (10 to 19 s here). The tests that kill a stage keep fresh interpreters."""
    scripts = sorted(str(p) for p in (ROOT / "stages").glob("*.py"))
    with preload_server(scripts, stage_env()) as (sock, _):
        yield [sys.executable, "-m", "rssqa.preload", "run", "--socket", str(sock), "--"]


@contextlib.contextmanager
def preload_server(preload: list[str], env: dict[str, str] | None = None):
    """``python -m rssqa.preload serve`` of ``preload``: ``(socket path, server process)``, the socket in a
    short folder (a Unix socket path has a length limit). On the way out the server is stopped, and must
    have removed its socket (the folder is removed empty)."""
    folder = Path(tempfile.mkdtemp(prefix="rssqa-", dir="/tmp"))
    sock = folder / "s.sock"
    cmd = [sys.executable, "-m", "rssqa.preload", "serve", "--socket", str(sock), "--preload", *preload]
    server = subprocess.Popen(cmd, cwd=ROOT, env=env)
    deadline = time.monotonic() + 30  # bound before preloading: a client that comes early waits for it
    while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield sock, server
    finally:
        server.terminate()
        server.wait(timeout=60)
        folder.rmdir()


def pretrain_smoke_args(out: Path, shards: Path, epochs: int, *extra: str) -> list[str]:
    """The smoke pretrain stage's command line, shrunk to 8-sample batches and two steps an epoch."""
    return [
        "--config", "conf/smoke/pretrain.yaml",
        "--out", str(out),
        "--data.shards", str(shards),
        "--data.batch_size", "8",
        "--data.samples_per_epoch", "16",
        "--data.eval_scenes", "12",
        "--data.eval_pairs", "16",
        "--data.eval_image_size", "32",
        "--trainer.max_epochs", str(epochs),
        "--checkpoint.every_n_train_steps", "2",
        "--wandb", "false",
        *extra,
    ]  # fmt: skip


# `make test` runs the suite in worker processes, whole files to a worker (pytest-xdist, --dist loadfile),
# handed out in collection order: the long files go first, so that neither worker ends alone on one of
# them while the other has finished. The whole-pipeline file first, then the files with slow tests.
_FIRST_FILES = ("tests/test_pipeline.py",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    files_with_slow = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item: pytest.Item) -> int:
        rel = item.path.relative_to(ROOT).as_posix() if item.path.is_relative_to(ROOT) else ""
        return 0 if rel in _FIRST_FILES else 1 if item.path in files_with_slow else 2

    items.sort(key=rank)  # stable: within a rank, the collection order


def tiny_world_config(seed: int = 0) -> WorldConfig:
    """The smoke world, shrunk further: 256 pairs at 32 px, 16 tiles per source."""
    return WorldConfig(
        seed=seed,
        corpus=CorpusConfig(n_samples=256, image_size=32, shard_size=64),
        sources=SourcesConfig(image_size=32, n_images=16),
    )


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A tiny world on disk (corpus shards + four sources in their real layouts), made once."""
    out = tmp_path_factory.mktemp("world")
    generate_world(tiny_world_config(), out, workers=1)
    return out


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """A tiny RS-SQED + one sqa stage run (its scorer folder under ``sqa/scorer``), built once per session."""
    from tests.tasks.test_sqa import trained_run

    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def scorer(run_root):
    """The scorer that run exported."""
    from rssqa.scorer import Scorer

    return Scorer.load(run_root / "sqa" / "scorer")


def patch_scorer_load(monkeypatch, edit) -> None:
    """Every ``Scorer.load`` of the test returns its scorer as ``edit(scorer)`` changed it (a ``scorer.json``
    field the stage did not write, without touching the shared scorer folder)."""
    from rssqa.scorer import Scorer

    original = Scorer.load

    def load(*a, **k):
        scorer = original(*a, **k)
        edit(scorer)
        return scorer

    monkeypatch.setattr(Scorer, "load", load)
