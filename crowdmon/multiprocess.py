"""Multi-worker servers: prometheus_client's multiprocess mode, prepared and kept clean.

Under gunicorn (or ``uvicorn --workers N``, ``granian --workers N``) each worker is a process
with its own memory, so prometheus_client keeps every value in files under
``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics`` sums them.  Three things make the totals exact:

1. the directory exists, is writable, and is set in the environment *before* any process imports
   prometheus_client (export it in the shell, the container spec or the systemd unit);
2. it is emptied at every server start, or a restart reports the old run's counts on top;
3. the ``live*`` gauges of a worker that died are removed (``mark_process_dead``), or they keep
   its last value forever.

This module is a gunicorn config module: ``gunicorn -c python:crowdmon.multiprocess ...`` gets
:func:`on_starting` (checks and empties the directory) and :func:`child_exit` (marks the dead
worker).  With a config file of your own, import both hooks into it.  ``uvicorn --workers N`` and
``granian --workers N`` have no hooks: empty the directory before starting them
(``python3 -m crowdmon.multiprocess``); dead workers are then cleaned at scrape time by :class:`crowdmon.MetricsApp`, which removes the live
gauges of every process id that no longer exists (:func:`prune_dead_processes`).
Without a hook, a restarted worker's dead predecessor is noticed at the next scrape.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
import tempfile
from typing import Any

from crowdmon.cardinality import SharedAdmissions
from crowdmon.instrumentation import CrowdmonSetupError, values_in_files

ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"
_LIVE_GAUGE_FILE = re.compile(r"^gauge_live[a-z]+_(\d+)\.db$")


def multiprocess_directory() -> str | None:
    """The directory prometheus_client's multiprocess mode writes to, or ``None`` when it is off."""
    return os.environ.get(ENV_VAR) or os.environ.get(ENV_VAR.lower()) or None


def check_directory(path: str | None = None) -> str:
    """The multiprocess directory, after checking that it exists and is writable.

    Raises :class:`~crowdmon.CrowdmonSetupError` with the fix when it is unset, missing, not a
    directory or not writable.
    """
    path = path or multiprocess_directory()
    if not path:
        state = "is set but empty" if ENV_VAR in os.environ else "is not set"
        raise CrowdmonSetupError(
            f"{ENV_VAR} {state}. Multi-worker servers need it in the environment before any "
            f"worker starts: mkdir -p /tmp/crowdmon-metrics && export {ENV_VAR}=/tmp/crowdmon-metrics"
        )
    if not os.path.isdir(path):
        raise CrowdmonSetupError(
            f"{ENV_VAR}={path!r} does not exist or is not a directory; create it before starting "
            f"the server: mkdir -p {path}"
        )
    if not _writable(path):
        raise CrowdmonSetupError(
            f"{ENV_VAR}={path!r} is not writable by this process (uid {os.getuid()}); every worker "
            f"writes its metric files there. Fix its owner or mode, or point {ENV_VAR} elsewhere."
        )
    return path


def _writable(path: str) -> bool:
    if not os.access(path, os.W_OK | os.X_OK):
        return False
    try:  # access() says yes to root everywhere; a real file says what the workers will meet
        with tempfile.TemporaryFile(dir=path, prefix=".crowdmon-probe-"):
            return True
    except OSError:
        return False


def check_process_setup() -> bool:
    """Whether this process records into multiprocess files; raises when that cannot work.

    prometheus_client picks in-memory or file-backed values once, when it is first imported, so
    the environment variable set (or unset) later in code is a mistake caught here, at set-up.
    """
    file_backed = values_in_files()
    path = multiprocess_directory()
    if path and not file_backed:
        raise CrowdmonSetupError(
            f"{ENV_VAR} was set after prometheus_client was imported, so this process keeps its "
            "metrics in memory and /metrics would miss them. Set it in the environment the server "
            f"starts with (shell, container spec, systemd unit), not in code: {ENV_VAR}={path}"
        )
    if file_backed and not path and os.environ.get(ENV_VAR) == "":
        raise CrowdmonSetupError(
            f"{ENV_VAR} is set but empty, which prometheus_client takes as multiprocess mode; set it "
            "to a directory every worker can write (e.g. /run/crowdmon-metrics), or unset it for "
            "one process"
        )
    if file_backed and not path:
        raise CrowdmonSetupError(
            f"{ENV_VAR} was removed from the environment after prometheus_client was imported in "
            "multiprocess mode; keep it set for the whole life of the server"
        )
    if path:
        check_directory(path)
    elif not file_backed and (workers := server_workers()) > 1:
        raise CrowdmonSetupError(
            f"this process is one of the {workers} workers its server was started with, each with "
            f"memory of its own, and {ENV_VAR} is not set: each "
            "worker's /metrics would count only its own requests, and counters would jump between "
            f"scrapes. Set it in the environment the server starts with: mkdir -p /tmp/crowdmon-metrics "
            f"&& export {ENV_VAR}=/tmp/crowdmon-metrics && python3 -m crowdmon.multiprocess"
        )
    return bool(path)


#: The environment variable a server takes its worker count from when ``--workers`` is not given.
_WORKERS_DEFAULT = {"uvicorn": "WEB_CONCURRENCY", "granian": "GRANIAN_WORKERS"}
#: Servers that run one worker at a time under ``--reload`` (granian keeps all of them).
_ONE_WORKER_ON_RELOAD = {"uvicorn"}


def server_workers() -> int:
    """How many worker processes the server this process belongs to runs, when its command line
    says so for certain (uvicorn's and granian's spawned workers and gunicorn's forked ones keep
    the server's):
    uvicorn's ``--workers N`` or, without it, ``WEB_CONCURRENCY`` (its default), unless
    ``--reload`` (one worker at a time); granian's ``--workers N`` or, without it,
    ``GRANIAN_WORKERS`` (also under ``--reload``, which keeps them all); gunicorn's ``-w N`` /
    ``--workers N`` (which override its config file and ``GUNICORN_CMD_ARGS``;
    ``WEB_CONCURRENCY`` is only a default they override in turn, so it does not count).  1 for
    anything else."""
    argv = sys.argv
    if not argv:
        return 1
    program = os.path.basename(argv[0])
    if program == "__main__.py":  # python3 -m uvicorn, python3 -m granian
        program = os.path.basename(os.path.dirname(argv[0]))
    if program in _WORKERS_DEFAULT:
        if program in _ONE_WORKER_ON_RELOAD and "--reload" in argv:
            return 1
        workers = os.environ.get(_WORKERS_DEFAULT[program])
    elif program == "gunicorn":
        workers = None
    else:
        return 1
    for index, argument in enumerate(argv[1:], 1):
        if argument == "--workers" or (program == "gunicorn" and argument == "-w"):
            workers = argv[index + 1] if index + 1 < len(argv) else None
        elif argument.startswith("--workers="):
            workers = argument.partition("=")[2]
        elif program == "gunicorn" and argument.startswith("-w") and argument[2:].isdigit():
            workers = argument[2:]
    try:
        return max(1, int(workers)) if workers else 1
    except ValueError:
        return 1


def prepare_directory(path: str | None = None) -> str:
    """Check the multiprocess directory and remove the metric files of a previous run.

    Only prometheus_client's ``*.db`` files and crowdmon's admitted label values
    (``crowdmon_labels_*.jsonl``) are removed, so a mistyped path loses nothing else.
    Call it once per server start, before the workers start; returns the directory.
    """
    path = check_directory(path)
    for pattern in ("*.db", SharedAdmissions.PREFIX + "*.jsonl"):
        for name in glob.glob(os.path.join(path, pattern)):
            os.remove(name)
    return path


def prune_dead_processes(path: str | None = None) -> list[int]:
    """Remove the live-gauge files of processes that no longer exist; returns their ids.

    What gunicorn's ``child_exit`` hook does for one worker, done for every dead worker at once:
    for servers without such a hook (``uvicorn --workers``).  The directory must belong to one
    server on one host (one process-id namespace), as prometheus_client requires anyway.
    """
    path = path or multiprocess_directory()
    if not path:
        return []
    dead = set()
    for name in os.listdir(path):
        match = _LIVE_GAUGE_FILE.match(name)
        if match is not None and not _process_exists(int(match.group(1))):
            dead.add(int(match.group(1)))
    for pid in dead:
        remove_live_gauges(pid, path)
    return sorted(dead)


def remove_live_gauges(pid: int, path: str | None = None) -> None:
    """prometheus_client's ``mark_process_dead``, safe to run twice at once (hook and scrape)."""
    path = path or multiprocess_directory()
    if not path:
        return
    for name in glob.glob(os.path.join(path, f"gauge_live*_{int(pid)}.db")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(name)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


# -- gunicorn server hooks (this module doubles as a gunicorn config module) -----------------------


def on_starting(server: Any) -> None:
    """gunicorn hook, in the master before any worker starts: check and empty the directory."""
    path = prepare_directory()
    server.log.info("crowdmon: multiprocess metrics in %s (emptied for this run)", path)


def child_exit(server: Any, worker: Any) -> None:
    """gunicorn hook, in the master when a worker exited: drop its live gauges."""
    remove_live_gauges(worker.pid)


def main(argv: list[str] | None = None) -> int:
    """``python3 -m crowdmon.multiprocess``: check and empty the directory before a server starts."""
    import argparse

    argparse.ArgumentParser(
        prog="python3 -m crowdmon.multiprocess",
        description=(
            "Check the directory PROMETHEUS_MULTIPROC_DIR names and remove the metric files "
            "(*.db) an earlier run left in it, before a multi-worker server starts. Run it once, "
            "before the server, not from a worker."
        ),
    ).parse_args(argv)
    try:
        path = prepare_directory()
    except CrowdmonSetupError as error:
        print(f"crowdmon: {error}", file=sys.stderr)
        return 2
    print(f"crowdmon: {path} is ready for a multi-worker server")
    return 0


if __name__ == "__main__":
    sys.exit(main())
