"""Whether the compiled request path (``crowdmon._speedups``) is there and may be used."""

from __future__ import annotations

import os
from types import ModuleType


def speedups() -> ModuleType | None:
    """``crowdmon._speedups``, unless ``CROWDMON_NO_EXTENSIONS`` is set in the environment or
    the package was installed without a C compiler."""
    if os.environ.get("CROWDMON_NO_EXTENSIONS"):
        return None
    try:
        from crowdmon import _speedups
    except ImportError:
        return None
    return _speedups
