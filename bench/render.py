#!/usr/bin/env python
"""Render a benchmark results folder's JSON records into one Markdown summary.

Reads whichever of these the folder holds (each a JSON list of records written by
``bench.harness.write_results``) and writes ``DIR/summary.md`` (or ``--out``):

* ``quality.json``    (bench/quality.py):    PSNR vs GT per model, rows solver, columns NFE
* ``throughput.json`` (bench/throughput.py): samples/s, latency, overhead over the model-only floor
* ``kernels.json``    (bench/bench_kernels.py): fused-kernel bandwidth vs a device copy
* ``pytest_gpu.txt`` / ``env.txt`` (bench/gpu_check.sh): the GPU test run's last lines, the machine

The same functions render each script's own Markdown file, so the tables in ``quality.md``,
``throughput.md`` and ``summary.md`` cannot drift apart.

    python bench/render.py bench/results/2026-11-27-cpu
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict

__all__ = ["quality_markdown", "throughput_markdown", "kernels_markdown", "summary_markdown",
           "machine_line", "main"]


def _f(v, digits=3):
    if v is None or v == "n/a":
        return "-" if v is None else "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, (int, float)):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if v == 0:
            return "0"
        return f"{v:.{digits}g}" if abs(v) < 10 ** digits else f"{v:.0f}"
    return str(v)


def machine_line(m: dict) -> str:
    if not m:
        return "* machine: unknown"
    return (f"* machine: gpu {m.get('gpu')} (driver {m.get('driver')}), cpu {m.get('cpu')} "
            f"x{m.get('cpu_count')}; torch {m.get('torch')}, triton {m.get('triton')}, CUDA "
            f"{m.get('cuda')}, python {m.get('python')}; git {m.get('git_commit')}")


def _table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- quality
SOLVER_ORDER = ["euler", "midpoint", "heun", "rk4", "bespoke-rk1", "bespoke-rk2", "bns",
                "ld3-ipndm", "ld3-dpm++2m", "ld3-unipc", "gits-midpoint",
                "torchdiffeq-euler", "torchdiffeq-midpoint", "torchdiffeq-rk4",
                "flow_matching-midpoint", "diffusers-euler", "diffusers-dpm++2m", "diffusers-unipc"]


def _order(names):
    known = [n for n in SOLVER_ORDER if n in names]
    return known + sorted(n for n in names if n not in SOLVER_ORDER)


def _cell(r):
    """'PSNR / PSNR set' of one result (older records have no set-level figure), with the 95%
    intervals, mode flips and fit seconds where the record has them."""
    if "psnr_set" not in r:
        return f"{r['psnr']:.2f}"
    if "psnr_ci" not in r:
        return f"{r['psnr']:.1f} / {r['psnr_set']:.1f}"
    (a, b), (c, d) = r["psnr_ci"], r["psnr_set_ci"]
    cell = f"{r['psnr']:.1f} [{a:.1f}, {b:.1f}] / {r['psnr_set']:.1f} [{c:.1f}, {d:.1f}]"
    if r.get("mode_flips") is not None:
        cell += f"; flips {100 * r['mode_flips']:.1f}%"
    if (r.get("train") or {}).get("wall_seconds") is not None:
        cell += f"; fit {r['train']['wall_seconds']:.0f} s"
        if r["train"].get("evaluations") is not None:
            cell += f", {r['train']['evaluations']:,} evals"
    return cell


def quality_markdown(records: list, title: str = "Sample quality vs NFE (PSNR dB vs GT)",
                     header_lines=None) -> str:
    """Per model: GT description, then a table (rows solver, columns NFE, cells PSNR dB; "-"
    where the solver cannot run at that NFE), then notes."""
    results = [r for r in records if r.get("kind") == "result"]
    gts = {r["model"]: r for r in records if r.get("kind") == "gt"}
    notes = [r for r in records if r.get("kind") == "note"]
    machine = next((r.get("machine") for r in records if r.get("machine")), {})
    lines = [f"# {title}", "", machine_line(machine)]
    lines += list(header_lines or [])
    lines += ["* Each cell: PSNR / PSNR set (dB). PSNR = mean over held-out noises of "
              "10 log10(R^2 / MSE_i) against the GT endpoint x(1) (RK45), the papers' convention; "
              "PSNR set = 10 log10(R^2 / mean_i MSE_i), which a few samples landing on the wrong "
              "mode dominate. R = data range; every solver starts from the SAME noises. Higher is "
              "better. Bespoke/BNS solvers are trained on the training trajectories only."]
    models = list(OrderedDict.fromkeys([r["model"] for r in results] + list(gts)))
    for model in models:
        lines += ["", f"## {model}", ""]
        g = gts.get(model)
        if g:
            interp = g.get("interpolation") or {}
            lines += [f"GT: {g['num_test']} held-out + {g['num_train']} training trajectories, RK45 "
                      f"rtol {g['rtol']:g} / atol {g['atol']:g}, {_f(g.get('nfe_per_trajectory'))} "
                      f"model evaluations per trajectory"
                      + (f" (the training GT: {g['train_gt_evaluations']:,} with its accuracy "
                         f"check)" if g.get("train_gt_evaluations") else "")
                      + "; Hermite interpolation RMSE "
                      f"{_f(interp.get('rmse_mean'))} (mean), endpoint RMSE vs a 100x tighter "
                      f"solve {_f(interp.get('endpoint_rmse_mean'))}.", ""]
        rs = [r for r in results if r["model"] == model]
        nfes = sorted({r["nfe"] for r in rs})
        by = {(r["solver"], r["nfe"]): r for r in rs}
        rows = []
        for s in _order({r["solver"] for r in rs}):
            lib = next(r.get("library", r.get("source", "")) for r in rs if r["solver"] == s)
            rows.append([f"{s}", lib] + [_cell(by[(s, n)]) if (s, n) in by else "-" for n in nfes])
        lines.append(_table(["solver", "library"] + [f"NFE {n}" for n in nfes], rows))
        trained = [r for r in rs if r.get("train")]
        for kind in ("bespoke", "bns", "ld3", "gits"):
            tk = [r for r in trained if r["train"].get("kind", "bespoke") == kind]
            if not tk:
                continue
            t0 = tk[0]["train"]
            total = sum(r["train"].get("wall_seconds") or 0 for r in tk)
            if "stop_reason" in t0:   # records with stopping rules (since the stopping rules)
                its = [r["train"].get("iterations") for r in tk if r["train"].get("iterations")]
                why = OrderedDict()
                for r in tk:
                    why[r["train"].get("stop_reason")] = why.get(r["train"].get("stop_reason"), 0) + 1
                lines += ["", f"Training ({kind}): {len(tk)} fits; "
                          + (f"{min(its)}-{max(its)} iterations; " if its else "")
                          + "stopped by " + ", ".join(f"{k} x{v}" for k, v in why.items())
                          + f"; {t0.get('num_train')} training pairs"
                          + (f" (+{t0.get('num_val')} for model selection)" if t0.get("num_val") else "")
                          + f"; {total:.0f} s of fitting in all for this model."]
                continue
            phases = (f"{t0.get('iters')} bound-phase + {t0.get('finetune_iters')} end-to-end "
                      f"fine-tune iterations" if kind == "bespoke" else
                      f"{t0.get('iters')} {t0.get('optimizer', '')} iterations on the "
                      f"end-to-end loss")
            lines += ["", f"Training ({kind}): {phases}, batch {t0.get('batch_size')}, on "
                      f"{t0.get('num_train')} trajectories (+{t0.get('num_val')} for model "
                      f"selection); {total:.0f} s of training in all for this model"
                      f"{' (some loaded from the cache)' if any(r['train'].get('cached') for r in tk) else ''}."]
        mism = [r for r in rs if r.get("nfe_measured") is not None
                and abs(r["nfe_measured"] - r["nfe"]) > 1e-9]
        for r in mism:
            lines.append(f"* WARNING: {r['solver']} at NFE {r['nfe']} called the model "
                         f"{r['nfe_measured']:g} times per sample")
        for n in notes:
            if n.get("model") == model:
                lines.append(f"* note: {n['text']}")
    lines += targets_markdown(records)
    descs = OrderedDict()
    for r in results:
        if r.get("description"):
            descs.setdefault(r["solver"], r["description"])
    if descs:
        lines += ["", "## Solvers", ""] + [f"* `{k}`: {descs[k]}" for k in _order(set(descs))]
    general = [n for n in notes if not n.get("model")]
    if general:
        lines += ["", "## Notes", ""] + [f"* {n['text']}" for n in general]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- quality targets
TARGET_FIT_SECONDS = 180.0


def _peers_at(by_solver: dict, nfe: int) -> list:
    """The rows a learned solver must beat at ``nfe``: every learned-grid peer and every
    diffusers scheduler (issue 16's definition of "every peer")."""
    return [r for (s, n), r in by_solver.items() if n == nfe
            and (r.get("library") in ("bench/peers_learned", "diffusers"))]


def _verdict(ok, text):
    return ("met" if ok else "**missed**") + f" ({text})"


def quality_targets(records: list) -> tuple:
    """``(header, rows)``: issue 16's targets evaluated cell by cell on the per-sample PSNR
    (set-level where the target says so), from the point estimates; "n/a" where a row is
    missing. Models in the records' order."""
    results = [r for r in records if r.get("kind") == "result" and r.get("psnr") is not None]
    models = list(OrderedDict.fromkeys(r["model"] for r in results))
    checks = [("bespoke-rk2@10 >= midpoint@20", "bespoke-rk2", 10, "midpoint", 20, 0.0, "psnr"),
              ("BNS@10 >= bespoke-rk2@10 + 3 dB", "bns", 10, "bespoke-rk2", 10, 3.0, "psnr")]
    beats = [(f"{s}@{n} > every peer", s, n) for s in ("bespoke-rk2", "bns") for n in (6, 8, 10)]
    sets = [(f"set-level {s}@10 >= midpoint@10", s) for s in ("bespoke-rk2", "bns")]
    rows = []
    table = {m: {(r["solver"], r["nfe"]): r for r in results if r["model"] == m} for m in models}
    for label, a, na, b, nb, margin, key in checks:
        row = [label]
        for m in models:
            ra, rb = table[m].get((a, na)), table[m].get((b, nb))
            row.append("n/a" if ra is None or rb is None else _verdict(
                ra[key] >= rb[key] + margin, f"{ra[key]:.1f} vs {rb[key]:.1f}"
                + (f" + {margin:g}" if margin else "")))
        rows.append(row)
    for label, s, n in beats:
        row = [label]
        for m in models:
            mine, peers = table[m].get((s, n)), _peers_at(table[m], n)
            if mine is None or not peers:
                row.append("n/a")
                continue
            best = max(peers, key=lambda r: r["psnr"])
            row.append(_verdict(mine["psnr"] > best["psnr"],
                                f"{mine['psnr']:.1f} vs {best['solver']} {best['psnr']:.1f}"))
        rows.append(row)
    for label, s in sets:
        row = [label]
        for m in models:
            mine, mid = table[m].get((s, 10)), table[m].get(("midpoint", 10))
            row.append("n/a" if mine is None or mid is None else _verdict(
                mine["psnr_set"] >= mid["psnr_set"],
                f"{mine['psnr_set']:.1f} vs {mid['psnr_set']:.1f}"))
        rows.append(row)
    row = [f"fit <= {TARGET_FIT_SECONDS:.0f} s (each bespoke-rk2 / BNS fit)"]
    for m in models:
        walls = [r["train"]["wall_seconds"] for r in table[m].values()
                 if r.get("train") and r["solver"] in ("bespoke-rk2", "bns")
                 and r["train"].get("wall_seconds") is not None]
        row.append("n/a" if not walls else _verdict(max(walls) <= TARGET_FIT_SECONDS,
                                                    f"longest {max(walls):.0f} s"))
    rows.append(row)
    return ["target"] + models, rows


def targets_markdown(records: list) -> list:
    """The targets table as Markdown lines (empty when no learned solver was run)."""
    if not any(r.get("kind") == "result" and r.get("solver") in ("bespoke-rk2", "bns")
               for r in records):
        return []
    header, rows = quality_targets(records)
    return ["", "## Targets", "",
            "Per-sample PSNR point estimates unless marked set-level; \"every peer\" = every "
            "learned-grid peer and every diffusers scheduler in the table at that NFE. Many "
            "cells lie within each other's 95% intervals (see the tables above).", "",
            _table(header, rows)]


# ----------------------------------------------------------------------------- throughput
def throughput_markdown(records: list, title: str = "Sampler throughput at NFE 10",
                        header_lines=None) -> str:
    """One table per configuration (model, batch, dtype): rows = samplers, with latency median
    and spread, samples/s, ratio to the model-only floor, setup (compile/capture) time, peak
    memory and NVML telemetry."""
    results = [r for r in records if r.get("kind") == "result"]
    notes = [r for r in records if r.get("kind") == "note"]
    machine = next((r.get("machine") for r in records if r.get("machine")), {})
    lines = [f"# {title}", "", machine_line(machine)]
    lines += list(header_lines or [])
    lines += ["* latency: one call producing a batch (median over reps; spread = p90 - p10); x floor: "
              "latency / floor (CPU: median over rounds of the paired per-round ratio, robust to "
              "the load drift of a shared CPU), the floor being the network alone on the "
              "sampler's own NFE inputs, "
              "measured in the same run (CUDA: the NFE forwards in one CUDA graph; CPU: plain "
              "forwards); setup: first call(s) incl. torch.compile / CUDA-graph capture, apart "
              "from steady state; max diff vs eager: max |x1 - x1_eager| for the rows that run "
              "the same midpoint steps."]
    configs = list(OrderedDict.fromkeys((r["regime"], r["model"], r["batch"], r["dtype"])
                                        for r in results))
    for regime, model, batch, dtype in configs:
        rs = [r for r in results if (r["regime"], r["model"], r["batch"], r["dtype"])
              == (regime, model, batch, dtype)]
        r0 = rs[0]
        lines += ["", f"## {regime}: {model} ({_f(r0.get('params'))} params, shape "
                  f"{tuple(r0.get('shape', ()))}), batch {batch}, {dtype}, {r0.get('device')}", ""]
        rows = []
        for r in rs:
            tel = r.get("telemetry") or {}
            rows.append([r["row"],
                         _f(r.get("median_ms")), _f(r.get("spread_ms")), _f(r.get("min_ms")),
                         _f(r.get("samples_per_s")), _f(r.get("x_floor")),
                         _f(r.get("setup_s")), _f(r.get("peak_mem_mib")),
                         _f(tel.get("avg_power_w")), _f(tel.get("energy_per_sample_j")),
                         _f(tel.get("gpu_util_pct")), _f(r.get("max_abs_diff_vs_eager"), 2),
                         (r.get("note") or "")])
        lines.append(_table(["sampler", "latency ms", "spread ms", "min ms", "samples/s",
                             "x floor", "setup s", "peak MiB", "avg W", "J/sample", "GPU util %",
                             "max diff vs eager", "note"], rows))
        target = [r for r in rs if r.get("target")]
        for r in target:
            lines.append(f"* target for {r['row']}: {r['target']} -> "
                         f"{'met' if r.get('meets_target') else 'MISSED'} "
                         f"(x floor {_f(r.get('x_floor'))}"
                         + (", median of per-round paired ratios; ratio of medians "
                            f"{_f(r.get('x_floor_of_medians'))})" if r.get("x_floor_paired")
                            is not None else ", ratio of medians)"))
    if notes:
        lines += ["", "## Notes", ""] + [f"* {n['text']}" for n in notes]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- kernels
def kernels_markdown(records: list) -> str:
    """Condensed view of bench_kernels.py's records: GB/s, % of copy, speed-up over eager."""
    if not records:
        return "# Fused solver-update kernels\n\n(no records)"
    machine = records[0].get("machine", {})
    lines = ["# Fused solver-update kernels (condensed; full table in kernels.md)", "",
             machine_line(machine), ""]
    rows = []
    for r in records:
        tag = r["op"] + (" +cfg" if r.get("guidance") else "")
        target = {True: "met", False: "MISSED"}.get(r.get("meets_target"), "-")
        rows.append([tag, r.get("model_dtype", ""), _f(r.get("state_mb")),
                     _f(r.get("median_ms"), 4), _f(r.get("gbps")), _f(r.get("pct_copy")),
                     _f(r.get("eager_median_ms"), 4), _f(r.get("speedup_vs_eager")), target])
    lines.append(_table(["op", "dtype", "state MB", "kernel ms", "GB/s", "% copy", "eager ms",
                         "speed-up", "target"], rows))
    missed = sum(1 for r in records if r.get("meets_target") is False)
    met = sum(1 for r in records if r.get("meets_target") is True)
    if met or missed:
        lines += ["", f"{met} point(s) meet the target, {missed} miss it."]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- summary
def _load(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        return e


def _tail(path, n=15):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return None


def summary_markdown(folder: str) -> str:
    """The combined Markdown for a results folder (see the module docstring)."""
    parts = [f"# Benchmark summary: `{os.path.basename(os.path.abspath(folder))}`", ""]
    env = _tail(os.path.join(folder, "env.txt"), 40)
    if env:
        parts += ["## Environment", "", "```"] + env + ["```", ""]
    status = _tail(os.path.join(folder, "status.txt"), 40)
    if status:
        parts += ["## Steps", "", "```"] + status + ["```", ""]
    py = _tail(os.path.join(folder, "pytest_gpu.txt"), 100000)
    if py is not None:
        bad = [ln for ln in py if ln.startswith(("FAILED", "ERROR"))][:30]
        final = [ln for ln in py if ln.strip()][-1:] if py else []
        try:  # counts from the JUnit XML when present (robust to -qq output)
            import xml.etree.ElementTree as ET
            root = ET.parse(os.path.join(folder, "pytest_gpu.xml")).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            a = suite.attrib
            final = [f"junit: {a.get('tests')} tests, {a.get('failures')} failures, "
                     f"{a.get('errors')} errors, {a.get('skipped')} skipped, {a.get('time')} s"]
        except Exception:
            pass
        parts += ["## GPU tests (`pytest -m gpu`)", "", "```"] + bad + final + ["```", ""]
    found = False
    for name, fn in (("kernels.json", kernels_markdown), ("throughput.json", throughput_markdown),
                     ("quality.json", quality_markdown)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        found = True
        data = _load(path)
        if isinstance(data, Exception):
            parts += [f"## {name}", "", f"could not read: {data}", ""]
            continue
        md = fn(data)
        parts += ["#" + md.replace("\n#", "\n##"), ""]   # demote one level under the summary
    if not found:
        parts += ["(no kernels.json, throughput.json or quality.json in this folder)"]
    return "\n".join(parts).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="results folder holding *.json from the bench scripts")
    p.add_argument("--out", default=None, help="output file (default FOLDER/summary.md)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(args.folder, "summary.md")
    md = summary_markdown(args.folder)
    from bespoke_fast.io import atomic_write_text   # here: rendering itself needs no torch
    atomic_write_text(out, md)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
