"""The one solver interface (bespoke_fast.solvers.base) for every learned kind: the registry,
documents and files, fingerprints, sizes, and the engine's choice of program by kind."""
from __future__ import annotations

import json

import pytest
import torch

from bespoke_fast import load_solver
from bespoke_fast._checks import SolverFileError
from bespoke_fast.engine import PROGRAMS, FastSampler
from bespoke_fast.solvers.base import Solver, kinds, solver_class
from bespoke_fast.solvers.bespoke import BespokeSolver
from bespoke_fast.solvers.bns import NonStationarySolver
from bespoke_fast.solvers.files import solver_from_document

KINDS = ["rk1", "rk2", "bns"]


def make(kind, n=4, seed=0):
    solver = NonStationarySolver(n, init="euler") if kind == "bns" else BespokeSolver(kind, n)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in solver.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return solver


def test_the_registry_holds_the_shipped_kinds_and_the_engine_has_a_program_for_each():
    assert kinds() == ("bespoke", "bns")
    assert solver_class("bespoke") is BespokeSolver and solver_class("bns") is NonStationarySolver
    assert solver_class("nope") is None and solver_class(None) is None
    assert set(PROGRAMS) == set(kinds())


@pytest.mark.parametrize("kind", KINDS)
def test_document_round_trip_file_bytes_and_fingerprint(kind, tmp_path):
    solver = make(kind)
    assert isinstance(solver, Solver) and solver_class(solver.kind) is type(solver)
    assert solver.nfe == type(solver).nfe_for(solver.header, solver.n_steps)
    doc = solver.to_document()
    assert doc[solver.header_key] == solver.header and doc["nfe"] == solver.nfe
    params, tables = type(solver).file_sizes(solver.header, solver.n_steps)
    assert {k: len(v) for k, v in doc["parameters"].items()} == params
    assert {k: len(v) for k, v in doc["tables"].items()} == tables
    back = solver_from_document(json.loads(json.dumps(doc)))
    assert type(back) is type(solver) and back.fingerprint() == solver.fingerprint()
    assert back.to_document() == doc
    solver.save(tmp_path / "s.json")
    assert (tmp_path / "s.json").read_text() == json.dumps(doc, indent=1) + "\n"
    assert load_solver(tmp_path / "s.json").fingerprint() == solver.fingerprint()
    assert type(solver).load(tmp_path / "s.json").fingerprint() == solver.fingerprint()
    assert make(kind, seed=1).fingerprint() != solver.fingerprint()
    for name, value in solver.sampler_tables().items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), name


def test_a_class_loads_only_its_own_kind(tmp_path):
    make("bns").save(tmp_path / "b.json")
    with pytest.raises(SolverFileError, match="holds a 'bns' solver, not a bespoke one"):
        BespokeSolver.load(tmp_path / "b.json")
    with pytest.raises(SolverFileError, match="not a bns one"):
        NonStationarySolver.from_document(make("rk2").to_document())
    with pytest.raises(TypeError, match="use bespoke_fast.load_solver for any kind"):
        Solver.load(tmp_path / "b.json")    # the interface reads no kind: the registry does


def test_the_engine_refuses_a_solver_without_a_program():
    class Unregistered(Solver):   # no kind: not in the registry, no engine program
        n_steps = 2

    with pytest.raises(TypeError, match="BespokeSolver or a NonStationarySolver"):
        FastSampler(lambda x, t: x, Unregistered(), (2,), 2)
    assert solver_class("") is None
