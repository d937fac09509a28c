"""Training-step benchmark (issue 8): a thin wrapper around :mod:`bbb.bench` (``bbb bench``).

python benchmarks/step_time.py --json runs/bench/step_time.json
python benchmarks/step_time.py --quick --no-peers       # smoke test in seconds
"""

from __future__ import annotations

import sys

from bbb.bench import main

if __name__ == "__main__":
    sys.exit(main(prog="benchmarks/step_time.py"))
