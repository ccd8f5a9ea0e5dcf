"""The preloaded interpreter: a stage forked from it runs as a fresh ``python script.py`` would."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import preload_server

# a standard-library module nothing here imports: in the stage's sys.modules only when the server preloaded it
MARKER = "xml.dom.minidom"
SCRIPT = """
import os, sys
print("argv", sys.argv[1:], "cwd", os.getcwd(), "X", os.environ.get("X"), "preloaded", {marker!r} in sys.modules)
if os.environ.get("SHOW"):
    print(os.environ.get(os.environ["SHOW"]))
if os.environ.get("NICE"):
    print("nice", os.getpriority(os.PRIO_PROCESS, 0))
if os.environ.get("PIDFILE"):
    open(os.environ["PIDFILE"], "w").write(str(os.getpid()))
    import time; time.sleep(60)
if os.environ.get("WALL"):
    from rssqa.runs import process_times
    print("wall", process_times()["wall_s"])
if os.environ.get("MEDIA"):  # write into the folder a preloaded library made at import
    import builtins
    open(os.path.join(builtins.rssqa_test_media.name, "table.json"), "w").write("{{}}")
if os.environ.get("ENDING"):  # what a stage leaves for its end: a thread, an exit handler, unflushed output
    import atexit, threading, time
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread done"))).start()
    atexit.register(lambda: print("exit handler ran"))
    sys.stdout.write("no newline")
if os.environ.get("FAIL"):
    raise ValueError("this stage failed")
sys.exit(int(os.environ.get("CODE", "0")))
"""


def _client(sock: Path, *argv: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rssqa.preload", "run", "--socket", str(sock), "--", *argv]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


# a library that makes a temporary folder when imported and removes it at exit, as wandb does for its media
# and that sets a variable read at start-up when imported, as torch does (TORCHINDUCTOR_CACHE_DIR)
LIBRARY = """
import atexit, builtins, os, tempfile
builtins.rssqa_test_media = tempfile.TemporaryDirectory("media")
atexit.register(builtins.rssqa_test_media.cleanup)
os.environ["TORCH_RSSQA_TEST"] = "set on import"
"""


@contextlib.contextmanager
def _serving(tmp_path: Path, library: str):
    """A server preloading MARKER and ``library`` (:func:`tests.conftest.preload_server`: it must remove
    its socket when stopped); ``tmp_path/stage.py`` is the stage it runs."""
    (tmp_path / "library.py").write_text(library)
    (tmp_path / "stage.py").write_text(SCRIPT.format(marker=MARKER))
    with preload_server([MARKER, "rssqa.runs", str(tmp_path / "library.py")]) as served:
        yield served


@pytest.fixture
def server(tmp_path):
    with _serving(tmp_path, LIBRARY) as s:
        yield s


def test_a_forked_stage_has_the_clients_streams_directory_environment_arguments_and_status(server, tmp_path):
    sock, _ = server
    r = _client(sock, "stage.py", "a", "b c", cwd=tmp_path, X="1", CODE="3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == f"argv ['a', 'b c'] cwd {tmp_path} X 1 preloaded True\n"
    # what the server's imports set is the stage's too (and not a difference from the client's environment)
    r = _client(sock, "stage.py", cwd=tmp_path, SHOW="TORCH_RSSQA_TEST")
    first, *shown = r.stdout.splitlines()
    assert first.endswith("preloaded True") and shown == ["set on import"], r.stderr
    # a stage's wall time counts from its fork, not from the server's import of rssqa
    time.sleep(1.5)
    r = _client(sock, "stage.py", cwd=tmp_path, WALL="1")
    assert r.returncode == 0 and float(r.stdout.split()[-1]) < 1.0, r.stdout
    # a module run with -m, the way make runs the report
    r = _client(sock, "-m", "json.tool", "--help", cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.startswith("usage: python -m json.tool")


def test_a_forked_stage_runs_at_its_clients_cpu_priority(server, tmp_path):
    sock, _ = server
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for prefix, expect in (([], base), (["nice", "-n", "5"], base + 5)):
        cmd = [*prefix, sys.executable, "-m", "rssqa.preload", "run", "--socket", str(sock), "--", "stage.py"]
        r = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "NICE": "1"}, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        first, shown = r.stdout.splitlines()
        assert first.endswith("preloaded True") and shown == f"nice {min(expect, 19)}", r.stdout


def test_a_forked_stage_ends_as_a_fresh_interpreter_would(server, tmp_path):
    sock, _ = server
    for socket_path in (sock, tmp_path / "no-server.sock"):  # forked (ended without tearing down) and afresh
        r = _client(socket_path, "stage.py", cwd=tmp_path, ENDING="1", CODE="4")
        assert r.returncode == 4, r.stderr
        assert r.stdout.splitlines()[1:] == ["no newlinethread done", "exit handler ran"], r.stdout


def test_without_a_server_or_with_other_start_up_settings_the_command_runs_afresh(server, tmp_path):
    sock, _ = server
    r = _client(tmp_path / "no-server.sock", "stage.py", "a", cwd=tmp_path, X="1")
    assert (r.returncode, r.stdout) == (0, f"argv ['a'] cwd {tmp_path} X 1 preloaded False\n")
    # a hash seed is fixed when an interpreter starts: a fork of the server's would not honour this one
    r = _client(sock, "stage.py", "a", cwd=tmp_path, X="1", PYTHONHASHSEED="123")
    assert (r.returncode, r.stdout) == (0, f"argv ['a'] cwd {tmp_path} X 1 preloaded False\n")
    assert "PYTHONHASHSEED differs from the server's; running it in a fresh interpreter" in r.stderr


def test_each_stage_has_its_own_copy_of_the_temporary_folders_the_preloaded_libraries_made(server, tmp_path):
    sock, _ = server
    for _ in range(2):  # the first stage's exit removes its folder, not the one the second writes into
        r = _client(sock, "stage.py", cwd=tmp_path, MEDIA="1")
        assert r.returncode == 0, r.stderr


def test_a_server_that_runs_threads_after_preloading_sends_every_stage_to_a_fresh_interpreter(tmp_path):
    # a fork copies another thread's locks, held or not: unsafe
    library = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
    with _serving(tmp_path, library) as (sock, _):
        r = _client(sock, "stage.py", cwd=tmp_path)
    assert (r.returncode, r.stdout.split()[-1]) == (0, "False")
    assert "after preloading, the server runs 2 threads (a fork would copy their locks)" in r.stderr


def test_a_socket_path_too_long_is_one_line_for_the_server_and_a_fresh_interpreter_for_the_client(tmp_path):
    sock = tmp_path / ("s" * 200 + ".sock")
    (tmp_path / "stage.py").write_text(SCRIPT.format(marker=MARKER))
    cmd = [sys.executable, "-m", "rssqa.preload", "serve", "--socket", str(sock)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith(f"rssqa.preload: cannot listen at {sock}: ")
    assert len(r.stderr.strip().splitlines()) == 1
    r = _client(sock, "stage.py", cwd=tmp_path)
    assert (r.returncode, r.stdout.split()[-1]) == (0, "False")


def test_a_failing_stage_prints_its_traceback_and_exits_1(server, tmp_path):
    sock, _ = server
    r = _client(sock, "stage.py", cwd=tmp_path, FAIL="1")
    assert r.returncode == 1
    assert "ValueError: this stage failed" in r.stderr.splitlines()[-1]


def test_a_stage_whose_client_is_killed_is_stopped_and_the_server_serves_on(server, tmp_path):
    sock, _ = server
    pidfile = tmp_path / "pid"
    cmd = [sys.executable, "-m", "rssqa.preload", "run", "--socket", str(sock), "--", "stage.py"]
    client = subprocess.Popen(
        cmd, cwd=tmp_path, env={**os.environ, "PIDFILE": str(pidfile)}, stdout=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    stage = int(pidfile.read_text())
    client.send_signal(signal.SIGKILL)
    client.wait()
    deadline = time.monotonic() + 10
    while _alive(stage) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(stage)
    r = _client(sock, "stage.py", cwd=tmp_path, CODE="0")
    assert (r.returncode, r.stdout.split()[-1]) == (0, "True")


def test_the_server_stops_on_sigterm_and_removes_its_socket(server):
    sock, proc = server
    proc.terminate()
    assert proc.wait(timeout=30) == 0
    assert not sock.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
