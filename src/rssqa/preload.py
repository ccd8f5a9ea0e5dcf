"""A preloaded interpreter for the pipeline's stage processes: the imports paid once, each stage forked.

On a small machine a stage process spends 10 to 19 s of one core importing torch, Lightning (which
imports all of torchmetrics), open_clip (torchvision, transformers, timm) and wandb before any work, and
``make demo`` starts a dozen of them. ``serve`` imports what the stage scripts import, once, then forks
a copy of itself for each ``run`` request: the copy takes the client's standard streams, working
directory, environment, CPU priority (``nice``) and command line, runs the script (or ``-m module``) as
``__main__`` and exits; the client exits with its status. A client that finds no server, or a server
whose interpreter differs from its own in what is fixed at start-up (the Python, ``PYTHONHASHSEED``, the
variables that libraries read when imported), runs the command itself: a recipe that goes through
``run`` works the same with or without a server.

    python -m rssqa.preload serve --socket /tmp/rssqa.sock --preload stages/*.py &
    python -m rssqa.preload run --socket /tmp/rssqa.sock -- stages/sqa.py --config conf/smoke/sqa.yaml ...

Forking is safe because the server runs one thread, has made no CUDA context and has run no torch
operator (no thread pool to lose in the copy): it checks the first two after preloading
(:func:`rssqa.processes.fork_hazard`, as before forking a stage's workers) and, where they do not hold,
sends every client back to a fresh interpreter. A stage's own helper processes (RS-SQED's local ranks,
its worker pools, DDP ranks) start as they do without a server, as the stage's children, so that it
counts their CPU time.

This module imports nothing beyond the standard library at the top: the client is a light process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

SOCKET_ENV = "RSSQA_PRELOAD"  # the client's default socket
# read once, when the interpreter starts or a library is imported: a stage run with other values than
# the server's must start afresh (the variables a stage reads at run time, WANDB_* or RSSQA_*, may differ)
_FIXED_AT_START = ("PYTHON", "HF_", "TRANSFORMERS_", "TORCH", "CUDA_", "OMP_", "MKL_", "KMP_", "LD_")
_HEADER = struct.Struct("!I")


# ---------------------------------------------------------------------------------------------- client
def run(socket_path: str | None, argv: Sequence[str]) -> int:
    """Run ``python *argv`` in a fork of the server at ``socket_path`` and return its exit status; in
    this process (``exec``) when there is no server or it cannot run the command as a fresh Python would."""
    if not argv:
        raise SystemExit("rssqa.preload run: no command given (-- script.py args, or -- -m module args)")
    conn = _connect(socket_path)
    if conn is None:
        _exec(argv)
    request = {"argv": list(argv), "cwd": os.getcwd(), "env": dict(os.environ), "prefix": sys.prefix,
               "version": sys.version, "nice": os.getpriority(os.PRIO_PROCESS, 0)}  # fmt: skip
    data = json.dumps(request).encode()
    with conn:
        socket.send_fds(conn, [_HEADER.pack(len(data))], [0, 1, 2])
        conn.sendall(data)
        for stop in (signal.SIGINT, signal.SIGTERM):  # the server stops the stage when this client goes
            signal.signal(stop, lambda sig, _: os._exit(128 + sig))
        reader = conn.makefile("r")
        for line in reader:
            reply = json.loads(line)
            if "fallback" in reply:
                print(
                    f"rssqa.preload: {reply['fallback']}; running it in a fresh interpreter", file=sys.stderr
                )
                _exec(argv)
            if "status" in reply:
                return int(reply["status"])
    print("rssqa.preload: the server went away before the command ended", file=sys.stderr)
    return 1


def _connect(socket_path: str | None) -> socket.socket | None:
    if not socket_path:
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(socket_path)
    except OSError:  # no server there (or a path too long for a socket): the command runs afresh
        conn.close()
        return None
    return conn


def _exec(argv: Sequence[str]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *argv])


# ---------------------------------------------------------------------------------------------- server
def serve(socket_path: str, preload: Sequence[str] = ()) -> int:
    """Listen at ``socket_path``, import ``preload`` (scripts are run as modules, not ``__main__``;
    other entries are imported as module names), then fork one copy per request until stopped.

    Returns the exit status: 0 in the server when stopped by SIGTERM, SIGINT or its parent's end;
    in a forked copy, the status of the command it ran.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    Path(socket_path).unlink(missing_ok=True)
    try:
        listener.bind(socket_path)
    except OSError as e:
        raise SystemExit(f"rssqa.preload: cannot listen at {socket_path}: {e.strerror or e}") from None
    listener.listen(64)  # clients that come while the server imports wait in the backlog
    server_pid, parent = os.getpid(), os.getppid()
    stages: dict[int, socket.socket] = {}  # the running stages' client connections
    stopping: set[int] = set()  # stages whose client has gone
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    start_env = dict(os.environ)
    try:
        refuse = _preload(preload)
        # what importing set (torch's compile cache folder, say), which a fresh stage would set as it imports
        added = {k: v for k, v in os.environ.items() if k not in start_env}
        while os.getppid() == parent:
            watched = [c for p, c in stages.items() if p not in stopping]
            readable, _, _ = select.select([listener, *watched], [], [], 0.2)
            for r in readable:
                if r is listener:
                    request = _start(listener, stages, refuse, start_env)
                    if request is not None:  # this is the forked copy
                        _leave(_run_stage(request, added))
                elif not r.recv(1):  # the client went away: its stage stops too
                    pid = next(p for p, c in stages.items() if c is r)
                    stopping.add(pid)
                    _kill(pid)
            _reap(stages)
            stopping &= stages.keys()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        if os.getpid() == server_pid:
            for pid in stages:
                _kill(pid)
            listener.close()
            Path(socket_path).unlink(missing_ok=True)


def _preload(entries: Sequence[str]) -> str | None:
    """Import ``entries``; return why forking is unsafe afterwards, or None."""
    import importlib
    import runpy

    from rssqa.processes import fork_hazard  # what rssqa.processes checks before forking its workers

    for entry in entries:
        try:
            if entry.endswith(".py"):
                runpy.run_path(entry, run_name="__rssqa_preload__")
            else:
                importlib.import_module(entry)
        except Exception as e:  # not preloaded: a stage that needs it imports it itself
            print(f"rssqa.preload: {entry} not preloaded: {type(e).__name__}: {e}", file=sys.stderr)
    hazard = fork_hazard()
    return None if hazard is None else f"after preloading, the server {hazard}"


def _start(
    listener: socket.socket, stages: dict[int, socket.socket], refuse: str | None, start_env: dict[str, str]
) -> dict | None:
    """Accept one request and fork its stage; return the request in the forked copy, None in the server."""
    conn, _ = listener.accept()
    try:
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        (size,) = _HEADER.unpack(header)
        request = json.loads(_recv_exactly(conn, size))
    except (OSError, ValueError, struct.error) as e:
        print(f"rssqa.preload: a bad request ({type(e).__name__}: {e}); ignored", file=sys.stderr)
        conn.close()
        return None
    why = refuse or _differs(request, start_env)
    if why:
        _reply(conn, {"fallback": why})
        conn.close()
        for fd in fds:
            os.close(fd)
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the copy holds no other client's connection, nor the listener
        listener.close()
        for other in stages.values():
            other.close()
        request["fds"] = fds
        request["conn"] = conn
        return request
    for fd in fds:
        os.close(fd)
    stages[pid] = conn
    _reply(conn, {"pid": pid})
    return None


def _differs(request: dict, start_env: dict[str, str]) -> str | None:
    """Why a fork of this server would not run the request as a fresh interpreter would, or None."""
    if request.get("prefix") != sys.prefix or request.get("version") != sys.version:
        return f"the client runs another Python ({request.get('prefix')}) than the server ({sys.prefix})"
    env = request.get("env", {})
    for name in sorted(set(env) | set(start_env)):
        if name.startswith(_FIXED_AT_START) and env.get(name) != start_env.get(name):
            return f"{name} differs from the server's"
    return None


def _run_stage(request: dict, added: dict[str, str]) -> int:
    """In the forked copy: take the client's streams, directory, environment (with what the imports
    ``added``) and command line, and run it."""
    import gc
    import runpy
    import tempfile
    import weakref

    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # what the server's imports made and clean up at exit is the server's: a stage that cleaned it up at its
    # own exit would take it from the stages still running. A fresh interpreter makes its own temporary
    # folders as it imports (wandb's media folder, removed at exit): each stage gets its own twin of them.
    for finalizer in list(weakref.finalize._registry):
        finalizer.atexit = False
    for obj in gc.get_objects():
        if issubclass(type(obj), tempfile.TemporaryDirectory):  # type(): no lazy __class__ lookups
            obj.name = tempfile.mkdtemp(dir=os.path.dirname(obj.name))
    request["conn"].close()  # the server keeps the connection (and reports this process's status on it)
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    os.chdir(request["cwd"])
    _take_priority(request.get("nice"))
    os.environ.clear()
    os.environ.update({**added, **request["env"]})
    argv = request["argv"]
    try:
        if argv[0] == "-m":
            sys.argv = argv[1:]
            sys.path[0] = os.getcwd()
            sys.modules.pop(argv[1], None)  # as in a fresh interpreter, __main__ is not the preloaded copy
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _take_priority(nice: int | None) -> None:
    """Run at the client's CPU priority, as a fresh interpreter started by it would (``nice -n 10 python -m
    rssqa.preload run ...``: a stage off the critical path yields the cores to the others)."""
    if nice is None or nice == os.getpriority(os.PRIO_PROCESS, 0):
        return
    with contextlib.suppress(PermissionError):  # a lower value than the server's needs privileges: keep its own
        os.setpriority(os.PRIO_PROCESS, 0, nice)


def _leave(status: int) -> NoReturn:
    """End a forked stage as a fresh interpreter ends, less the teardown of every module: its other
    threads joined, the exit handlers run (W&B's, logging's, the temporary folders'), the streams
    flushed, then the process ends with ``status``. Tearing down a heap of torch and its kin took about
    2 s of each stage's end (every page of it written again in the fork), and the next stage waited."""
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _reap(stages: dict[int, socket.socket]) -> None:
    """Report each ended stage's exit status to its client."""
    while stages:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = stages.pop(pid, None)
        if conn is not None:
            code = os.waitstatus_to_exitcode(status)
            _reply(conn, {"status": code if code >= 0 else 128 - code})
            conn.close()


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def _reply(conn: socket.socket, obj: dict) -> None:
    with contextlib.suppress(OSError):  # the client has gone: nothing to tell
        conn.sendall((json.dumps(obj) + "\n").encode())


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = conn.recv(min(left, 1 << 16))
        if not chunk:
            raise ValueError(f"the request ended after {size - left} of {size} bytes")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rssqa.preload", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="import once, then fork one copy per stage")
    s.add_argument("--socket", required=True, help="Unix socket path (short: at most about 100 characters)")
    s.add_argument("--preload", nargs="*", default=[], help="scripts (*.py, run as modules) and module names")
    r = sub.add_parser("run", help="run a command through the server (or directly, without one)")
    r.add_argument(
        "--socket", default=os.environ.get(SOCKET_ENV), help="the server's socket (default $RSSQA_PRELOAD)"
    )
    r.add_argument("argv", nargs=argparse.REMAINDER, help="-- script.py args ... | -- -m module args ...")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.socket, args.preload)
    return run(args.socket, args.argv[1:] if args.argv[:1] == ["--"] else args.argv)


if __name__ == "__main__":
    sys.exit(main())
