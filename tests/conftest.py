"""Fixtures shared by the whole suite: isolated registries and real servers on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import settings
from prometheus_client import CollectorRegistry

from crowdmon import PrometheusInstrumentation

# crowdmon's own pytest plugin (the crowdmon_instrumentation fixture).  An installed crowdmon
# registers it under this name through its pytest11 entry point, and then this line does nothing.
pytest_plugins = ["crowdmon.testing"]

# The suite is deterministic: property tests draw the same examples on every run, so a run that
# passes passes again. Set HYPOTHESIS_PROFILE=explore for fresh random examples.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def instrumentation(registry: CollectorRegistry) -> Iterator[PrometheusInstrumentation]:
    yield PrometheusInstrumentation(registry)



@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Every ``async def`` test runs under anyio's plugin (``anyio_mode = "auto"``) on asyncio."""
    return "asyncio"
