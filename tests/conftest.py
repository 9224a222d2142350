"""Fixtures shared by the whole suite: isolated registries and real servers on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from crowdmon import PrometheusInstrumentation


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
