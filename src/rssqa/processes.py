"""How a stage starts its worker processes: forked where that is safe, spawned otherwise.

A spawned worker is a fresh interpreter: it imports torch, open_clip and Lightning again (about ten
seconds of one core on a small machine) and loads again what its parent had loaded. A forked worker
starts with its parent's modules and objects as they are. Forking is safe on Linux when the parent runs
a single thread (a lock held by another thread would stay held in the child), has made no CUDA context
(a child cannot use its parent's) and the workers run torch on one thread each (an OpenMP pool of the
parent is not there in the child). :func:`worker_context` forks then and spawns otherwise;
``RSSQA_START_METHOD=spawn`` (or ``fork``) decides instead, e.g. to compare the two.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
from multiprocessing.context import BaseContext

from rssqa.errors import RSSQAError

START_METHOD_ENV = "RSSQA_START_METHOD"


def worker_context(one_thread: bool) -> BaseContext:
    """The multiprocessing context for a pool of workers started now.

    Args:
        one_thread: the workers run torch on one thread each.

    Returns:
        ``fork`` on Linux while this process runs one thread and has no CUDA context, for one-thread
        workers; ``spawn`` otherwise; or what ``RSSQA_START_METHOD`` names.
    """
    asked = os.environ.get(START_METHOD_ENV, "").strip()
    if asked:
        if asked not in ("fork", "spawn"):
            raise RSSQAError(f"{START_METHOD_ENV}={asked!r}: choose fork or spawn")
        return multiprocessing.get_context(asked)
    safe = sys.platform.startswith("linux") and one_thread and fork_hazard() is None
    return multiprocessing.get_context("fork" if safe else "spawn")


def fork_hazard() -> str | None:
    """What in this process makes a fork unsafe, or None: other threads (a fork copies their locks, held
    or not) or a CUDA context (a fork cannot use it)."""
    if threading.active_count() > 1:
        return f"runs {threading.active_count()} threads (a fork would copy their locks)"
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "has made a CUDA context (a fork cannot use it)"
    return None


def forked(context: BaseContext) -> bool:
    """Whether workers of ``context`` start as copies of this process (and so have what it has loaded)."""
    return context.get_start_method() == "fork"

