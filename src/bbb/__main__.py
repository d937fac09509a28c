"""``python -m bbb``: the ``bbb`` command (:func:`bbb.cli.main`).

A Ctrl-C while the command's modules are still importing is the one-line ``bbb: interrupted``
with exit status 130, as :func:`bbb.cli.main` makes one that comes later (it imports torch
inside its own handler). Python imports the package ``bbb`` (``bbb/__init__.py``) before this
module runs: only an interrupt after that reaches the handler here.
"""

import sys

try:
    from .cli import main
except KeyboardInterrupt:
    print("bbb: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
