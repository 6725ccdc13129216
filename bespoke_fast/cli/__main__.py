"""``python -m bespoke_fast.cli``: the ``bespoke-fast`` command."""
import sys

from . import main

sys.exit(main())
