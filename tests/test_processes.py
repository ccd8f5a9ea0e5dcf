"""How worker pools start: forked only where that is safe, spawned otherwise, or as asked."""

from __future__ import annotations

import sys
import threading

import pytest

from rssqa.errors import RSSQAError
from rssqa.processes import START_METHOD_ENV, forked, worker_context


def test_forks_one_thread_workers_of_a_one_thread_process_on_linux(monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(sys, "platform", "linux")
    assert forked(worker_context(one_thread=True))
    assert not forked(worker_context(one_thread=False))  # an OpenMP pool of this process is not in a child
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not forked(worker_context(one_thread=True))


def test_spawns_while_another_thread_runs(monkeypatch):
    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert worker_context(one_thread=True).get_start_method() == "spawn"
    finally:
        stop.set()
        other.join()


def test_spawns_once_cuda_is_in_use(monkeypatch):
    import torch

    monkeypatch.delenv(START_METHOD_ENV, raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert worker_context(one_thread=True).get_start_method() == "spawn"


def test_the_variable_decides_and_is_checked(monkeypatch):
    monkeypatch.setenv(START_METHOD_ENV, "spawn")
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert worker_context(one_thread=True).get_start_method() == "spawn"
    monkeypatch.setenv(START_METHOD_ENV, "thread")
    with pytest.raises(RSSQAError, match=r"RSSQA_START_METHOD='thread': choose fork or spawn"):
        worker_context(one_thread=True)
