"""The benchmarks of bespoke_fast: a package of scripts and the modules they share.

It is not installed (``setup.py`` lists only ``bespoke_fast``); it imports from a checkout, with
the repository root on ``sys.path`` (``python -m pytest``, ``python -m bench.quality`` from the
root, or a script run as a file, which ``bench/_path.py`` sets up). Importing the package
imports nothing else.

Shared modules:

* ``harness.py``: the measurement harness: machine record (never the hostname), git commit,
  timers (``timeit_cuda`` with an L2 flush, ``timeit_cpu``), ``write_results`` (JSON +
  Markdown), ``markdown_table``, ``command_line``, ``Counted`` (counts model calls).
* ``peers.py``: the other libraries' samplers on our velocity model (torchdiffeq,
  flow_matching's ``ODESolver``, diffusers' flow schedulers): ``PEERS``, ``peer_status``.
* ``peers_learned.py``: learned-time-grid peers written from their papers (LD3, GITS) for
  iPNDM, DPM-Solver++(2M), UniPC and the midpoint rule, fitted on the same GT pairs as the
  Bespoke / BNS solvers.
* ``models.py``: random-weight velocity networks for the throughput benches.
* ``render.py``: a results folder's JSON records as one ``summary.md`` (also a script).
* ``telemetry.py``: GPU power / energy through NVML while a bench runs.
* ``_path.py``: the bootstrap of a script run as a file.

Scripts (each writes JSON + Markdown, into ``bench/results/...`` by default or ``--out``; each has
``--help``), run from the repository root as files or as modules::

    python bench/quality.py --quick --out /tmp/q       # = python -m bench.quality ...
    python bench/throughput.py --help                  # sampler throughput at NFE 10
    python bench/bench_kernels.py --help               # the fused kernels' bandwidth
    python bench/fit_cost.py --help                    # what a fit costs
    python bench/cpu_sampling.py --help                # CPU sampling overhead
    python bench/diffusers_tiny.py --help              # tiny random diffusers pipelines
    python bench/photo32_evidence.py --help            # photo-32 against its held-out crops
    python bench/render.py RESULTS_DIR                 # summary.md of a results folder
    bash bench/gpu_check.sh OUT_DIR                    # the one GPU check (--dry-run on CPU)
"""
