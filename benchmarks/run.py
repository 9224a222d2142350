"""Run crowdmon's benchmarks: ``python3 benchmarks/run.py [asgi|decorators|server|scrape|memory] [--quick]``.

The same as ``crowdmon bench``; see benchmarks/README.md for what the numbers mean.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crowdmon.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
