"""The request path exists twice: compiled (``crowdmon/_speedups.c``) and in Python
(``crowdmon/_core.py``, for installs without a C compiler).  The suite runs on the compiled one;
here the tests of the request path run again on the Python one, in a process of their own, and
the two are held to the same answers."""

from __future__ import annotations

import re
import subprocess

import crowdmon._core
import crowdmon.middleware
from tests.support import PYTHON, REPO_ROOT, subprocess_env

#: Every test file that drives requests through the middleware.
REQUEST_PATH_TESTS = [
    "tests/test_middleware.py",
    "tests/test_middleware_call.py",
    "tests/test_recorder.py",
    "tests/test_fast_paths.py",
    "tests/test_routes.py",
    "tests/test_route_label_cache.py",
    "tests/test_request_lifetime.py",
    "tests/test_reliability_faults.py",
    "tests/test_reliability_protocol.py",
    "tests/test_production_exemplars.py",
    "tests/test_tracking.py",
]


def test_the_suite_runs_on_the_compiled_request_path() -> None:
    # An install from source with a C compiler builds it (pip install -e . does, in place);
    # tests/install-deps.sh installs the compiler and the Python headers if they are missing.
    assert crowdmon.middleware.COMPILED, (
        "crowdmon._speedups did not build or import: install a C compiler and the Python headers "
        "(Debian: apt-get install gcc python3-dev), then pip install -e . again"
    )
    assert crowdmon.middleware.MiddlewareCore is not crowdmon._core.MiddlewareCore


def test_the_request_path_tests_pass_on_the_python_core() -> None:
    env = subprocess_env({"CROWDMON_NO_EXTENSIONS": "1"})
    probe = subprocess.run(
        [PYTHON, "-c", "import crowdmon.middleware as m; print(m.COMPILED)"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert probe.stdout.strip() == "False", probe.stderr

    run = subprocess.run(
        [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *REQUEST_PATH_TESTS],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    passed = re.search(r"(\d+) passed", summary)
    assert passed is not None and int(passed.group(1)) >= 100, summary
    assert "skipped" not in summary, summary
