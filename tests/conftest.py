"""Fixtures shared by the whole suite: isolated registries and real servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from crowdmon import PrometheusInstrumentation

# crowdmon's own pytest plugin (the crowdmon_instrumentation fixture).  An installed crowdmon
# registers it under this name through its pytest11 entry point, and then this line does nothing.
pytest_plugins = ["crowdmon.testing"]


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
