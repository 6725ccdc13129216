"""bespoke_fast: learned Bespoke solvers for flow models, fused Triton kernels, and a sampler
that captures the whole NFE loop in one CUDA graph.

Data flows one way: model -> GT trajectories -> trainer -> solver file -> engine -> samples.

    >>> import torch, bespoke_fast as bf
    >>> model = bf.zoo.load("gmm-64").model            # any model(x, t[B]) -> u
    >>> x1 = bf.solve(model, torch.randn(4, 64), method="midpoint", n_steps=10)

Layout (the README's "Layout" section has the tree): ``solvers/`` (the one solver interface
``solvers/base.py``, the solver files ``solvers/files.py``, fixed / adaptive / bespoke / BNS
solvers), ``ops/`` (each reference op beside the dispatch to its Triton twin; the table layouts
in ``ops/table.py``), ``engine/`` (``FastSampler`` and one program per solver kind), ``fitting/``
(GT, the two trainers on shared helpers, evaluation, the fit job), and the
Triton kernels, which live in the repository's top-level ``kernels/`` folder
(``kernels/bespoke_fast_kernels/``) and install as ``bespoke_fast.kernels``.

Importing this package is cheap: it loads submodules on first use, needs neither triton nor a
GPU, and queries no GPU.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    # models.py: velocity contract, adapters, exact flows
    "as_velocity": "models", "cfg": "models", "from_torchdiffeq": "models",
    "to_torchdiffeq": "models", "GaussianPath": "models", "GaussianMixtureFlow": "models",
    # solvers
    "solve": "solvers.fixed", "solve_adaptive": "solvers.adaptive",
    "BespokeSolver": "solvers.bespoke", "NonStationarySolver": "solvers.bns",
    "load_solver": "solvers.files",
    # fit
    "generate_trajectories": "fitting.gt", "load_trajectories": "fitting.gt",
    "train": "fitting.bespoke", "evaluate": "fitting.evaluation",
    "fit": "fitting.job",
    # engine
    "FastSampler": "engine",
    # capture check (CPU-side, before a GPU run)
    "check_capturable": "capture", "CaptureReport": "capture",
    # the documented error types (bespoke_fast._checks)
    **{name: "_checks" for name in (
        "BespokeFastError", "InvalidArgumentError", "InvalidTypeError", "InvalidFileError",
        "SolverFileError", "MissingFileError", "MismatchError", "ModelContractError",
        "NonFiniteError", "OutputError", "MissingDependencyError", "ModelError")},
}
_SUBMODULES = ("models", "solvers", "io", "ops", "fitting", "engine", "metrics", "zoo", "cli",
               "capture", "sampling", "utils")

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module("." + _LAZY[name], __name__)
        return getattr(module, name)
    if name in _SUBMODULES:
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'bespoke_fast' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))
