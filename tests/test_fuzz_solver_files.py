"""Seeded fuzzing of the solver-file loader: whatever the bytes, ``load_solver`` either returns a
solver whose float32 sampler coefficients are finite, or raises ``SolverFileError`` naming the
file. Never another exception, never a hang or a large allocation (sizes are checked first)."""
import collections
import json
import random
import re

import torch

import bespoke_fast as bf
from bespoke_fast._checks import SolverFileError
from bespoke_fast.solvers.files import MAX_STEPS

CASES = 3000
EXTREMES = [0.0, -0.0, 1.0, -1.0, -95.0, 95.0, 88.8, -88.8, 700.0, -745.0, 1e308, -1e308, 1e-320,
            3.4e38, -3.4e38, 1e-45, 2.0 ** 63, 10 ** 19, -(10 ** 19)]
ODD_VALUES = [None, True, False, "1", 10.0, 2 ** 63, 10 ** 25, -1, 0, 12000, 10 ** 8, [], {}, [1.0],
              "rk2", "bns", 1.5, float("nan"), float("inf")]


def _seed_solvers():
    """Valid starting points: every kind, base and init, trained-looking parameters."""
    g = torch.Generator().manual_seed(1)
    out = []
    for solver in (bf.BespokeSolver("rk1", 3), bf.BespokeSolver("rk2", 4),
                   bf.NonStationarySolver(4, "euler"), bf.NonStationarySolver(6, "midpoint")):
        with torch.no_grad():
            for p in solver.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        solver.meta = {"model": {"name": "m", "hash": "0123456789abcdef"}}
        out.append(solver)
    return out


def _consistent(solver, rng):
    """A self-consistent file (stored tables derived from the parameters) with extreme values:
    what a careful attacker writes. Returns the document."""
    with torch.no_grad():
        for p in solver.parameters():
            flat = p.view(-1)
            for _ in range(rng.randint(1, 3)):
                flat[rng.randrange(flat.numel())] = float(rng.choice(EXTREMES)) * rng.choice([1, 0.5, 2])
    return _doc(solver)


def _doc(solver):
    with torch.no_grad():
        tables = {k: v.tolist() for k, v in solver.tables().items()}
    return {"format": "bespoke_fast.solver", "format_version": 1, "kind": solver.kind,
            **solver.file_header(), "n_steps": solver.n_steps, "nfe": solver.nfe,
            "parameters": solver.raw_parameters(), "tables": tables,
            "model": solver.meta.get("model", {}), "training": {}, "validation": {}}


def _mutate_doc(doc, rng):
    kind = rng.randrange(6)
    if kind == 0:                                  # a header field gets an odd value
        doc[rng.choice(["format_version", "n_steps", "nfe", "kind", "base", "init", "format",
                        "model", "parameters", "tables"])] = rng.choice(ODD_VALUES)
    elif kind == 1:                                # an array gets longer / shorter / odd entries
        section = doc[rng.choice(["parameters", "tables"])]
        name = rng.choice(sorted(section))
        values = section[name]
        op = rng.randrange(3)
        if op == 0 and values:
            values.pop()
        elif op == 1:
            values.extend([0.5] * rng.randint(1, 5))
        elif values:
            values[rng.randrange(len(values))] = rng.choice(ODD_VALUES + EXTREMES)
    elif kind == 2:                                # n_steps claims a huge size, arrays stay small
        doc["n_steps"] = rng.choice([12000, 30000, 10 ** 8, 2 ** 63, 2 ** 64 + 1, MAX + 1])
        doc["nfe"] = doc["n_steps"]
    elif kind == 3:                                # a key removed
        doc.pop(rng.choice(sorted(doc)))
    elif kind == 4:                                # a table value nudged
        section = doc["tables"]
        name = rng.choice(sorted(section))
        if section[name]:
            section[name][rng.randrange(len(section[name]))] *= rng.choice([-1, 1.0001, 0, 1e300])
    else:                                          # the model record
        doc["model"] = rng.choice([{"name": 1}, {"hash": []}, "x", {"name": "a", "hash": "b"}])
    return json.dumps(doc)


def _mutate_text(text, rng):
    kind = rng.randrange(7)
    if kind == 0:                                  # truncated (a kill mid-write)
        return text[:rng.randrange(len(text))]
    if kind == 1:                                  # flipped bytes
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        return bytes(raw)
    if kind == 2:                                  # deep nesting
        d = rng.choice([40, 1000, 5000, 100000])
        return text.replace('"training": {}', '"training": ' + "[" * d + "]" * d, 1)
    if kind == 3:                                  # huge integers
        return text.replace('"n_steps": ', '"n_steps": ' + "9" * rng.choice([19, 21, 309, 4301]) + ", \"x\": ", 1)
    if kind == 4:                                  # duplicate keys
        return text.replace('"nfe": ', '"nfe": 2, "nfe": ', 1)
    if kind == 5:                                  # NaN / Infinity literals
        return re.sub(r"(\d)\]", r"\1, NaN]", text, count=1)
    return "\ufeff" + text if rng.random() < 0.5 else text + "\x00"


MAX = MAX_STEPS
REASONS = ("not JSON", "not UTF-8", "nested deeper", "digits", "duplicate key", "NaN or Inf",
           "'n_steps'", "'nfe'", "format_version", "'format'", "unknown kind", "unknown base",
           "unknown init", "even number of steps", "entries, expected", "must hold exactly",
           "list of numbers", "is not finite", "strictly increasing", "start at 0", "must be > 0", "overflow",
           "does not match", "must be an object", "name and hash", "too large")


def _finite_model(x, t):
    """A finite velocity field, bounded and smooth (not one of the loader's own fields)."""
    return torch.tanh(x) * (1 + t.reshape(-1, 1)) - 0.5 * x


def _noise(case):
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(case))


def fuzz(cases=CASES, seed=0, tmp_path=None):
    """Run the fuzzer; returns (accepted, Counter of rejection reasons, list of failures)."""
    rng = random.Random(seed)
    seeds = _seed_solvers()
    accepted, reasons, failures = 0, collections.Counter(), []
    path = tmp_path / "fuzz.json"
    for case in range(cases):
        base = seeds[case % len(seeds)]
        solver = type(base)(*((base.base, base.n_steps) if base.kind == "bespoke"
                              else (base.n_steps, base.init)))
        solver.load_state_dict(base.state_dict())
        solver.meta = dict(base.meta)
        choice = rng.randrange(3)
        if choice == 0:
            data = json.dumps(_consistent(solver, rng))
        elif choice == 1:
            data = _mutate_doc(_doc(solver), rng)
        else:
            data = _mutate_text(json.dumps(_doc(solver), indent=1), rng)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
        try:
            loaded = bf.load_solver(path)
        except SolverFileError as e:
            msg = str(e)
            if not msg.startswith(str(path)):
                failures.append((case, "error does not name the file", msg))
            reasons[next((k for k in REASONS if k in msg), "other")] += 1
            continue
        except Exception as e:  # noqa: BLE001 -- the point of the test
            failures.append((case, type(e).__name__, str(e)[:200]))
            continue
        accepted += 1
        for name, value in loaded.sampler_tables().items():
            if not torch.isfinite(value).all():
                failures.append((case, "accepted with non-finite float32 coefficients", name))
        with torch.no_grad():                       # a finite model: the samples are finite
            x = loaded.sample(_finite_model, _noise(case))
        if not torch.isfinite(x).all():
            failures.append((case, "accepted, then NaN/Inf samples with a finite model", ""))
    return accepted, reasons, failures


def test_fuzzed_solver_files_load_or_fail_cleanly(tmp_path):
    accepted, reasons, failures = fuzz(tmp_path=tmp_path)
    assert not failures, failures[:5]
    # the fuzzer must exercise both sides: files that load and many kinds of rejection
    assert accepted > CASES // 20 and sum(reasons.values()) > CASES // 2 and len(reasons) > 15
