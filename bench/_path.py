"""Bootstrap for a bench script run as a file (``python bench/quality.py ...``).

Python then puts the script's folder, ``bench/``, first on ``sys.path``; the scripts import
their siblings as the package ``bench`` (``from bench.harness import ...``), which needs the
repository root instead. Each script's first import does, only when it runs as a file (its
``__package__`` is empty)::

    if not __package__:  # python bench/x.py: the repository root, not bench/, on sys.path
        import _path  # noqa: F401

This module takes ``bench/`` off ``sys.path`` (so no sibling is ever imported twice, as
``render`` and ``bench.render``) and appends the repository root (last, so ``bespoke_fast`` is
the one Python would import anyway: an install, ``PYTHONPATH``; from a bare checkout, the
repository's). ``python -m bench.quality`` from the root needs none of this. If ``import bench``
would find another package of that name, it stops with a one-line message.
"""
import os
import sys
from importlib.util import find_spec

BENCH = os.path.dirname(os.path.realpath(__file__))
REPO = os.path.dirname(BENCH)

sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.curdir) != BENCH]
if REPO not in sys.path:
    sys.path.append(REPO)
_spec = find_spec("bench")
if _spec is None or not any(os.path.realpath(p) == BENCH
                            for p in (_spec.submodule_search_locations or ())):
    sys.exit(f"bench: `import bench` finds {getattr(_spec, 'origin', None)!r}, not {BENCH}; "
             f"run `python -m bench.<script>` from {REPO}")
