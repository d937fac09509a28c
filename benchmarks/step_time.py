"""Training-step benchmark (issue 8): a thin wrapper around :mod:`bbb.bench` (``bbb bench``).

python benchmarks/step_time.py --json runs/bench/step_time.json
python benchmarks/step_time.py --quick --no-peers       # smoke test in seconds

Its options, errors and exit codes are ``bbb bench``'s (:func:`bbb.bench.script_main`): an
error is one line, ``benchmarks/step_time.py: error: ...`` (``--debug``: the traceback), exit
code 2 for a malformed command line and 1 for a refused value or a failure.
"""

from __future__ import annotations

import sys

from bbb.bench import script_main

if __name__ == "__main__":
    sys.exit(script_main(prog="benchmarks/step_time.py"))
