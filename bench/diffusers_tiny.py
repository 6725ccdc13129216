"""Tiny random-weight diffusers pipelines (CPU): a fitted bespoke solver (and a BNS solver started
from it) against the pipeline's
FlowMatchEuler, DPM-Solver++(2M) and UniPC at equal NFE, the cost of bf16 time quantisation,
the fast path against pipe(...), and wall time per image of both loops.

    python bench/diffusers_tiny.py --out bench/results/2026-12-01-cpu

Writes diffusers_tiny.json and diffusers_tiny.md. Random weights: the numbers show the
integration works and what the fitted solver buys on this ODE, not image quality.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import bespoke_fast as bf
from bespoke_fast.fitting.bns import train_bns
from bespoke_fast.integrations import diffusers as bd
from bespoke_fast.io import atomic_write_text
from bespoke_fast.metrics import rmse_psnr


def sd3_setup(num_prompts=4, guidance=3.0, seed=0):
    """The tiny SD3 pipeline, a table of prompt embeddings (+ negatives) and the guided model."""
    pipe = bd.tiny_pipeline("sd3", seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    table = {"prompt_embeds": torch.randn(num_prompts, 5, 16, generator=g),
             "pooled_prompt_embeds": torch.randn(num_prompts, 8, generator=g),
             "negative_prompt_embeds": torch.randn(num_prompts, 5, 16, generator=g),
             "negative_pooled_prompt_embeds": torch.randn(num_prompts, 8, generator=g)}
    model = bd.velocity_model(pipe, guidance_scale=guidance, **table)
    return pipe, table, model


def pipeline_sample(pipe, scheduler, table, gt, guidance, nfe):
    """pipe(...) with ``scheduler`` from the GT noises, conditioning looked up per trajectory."""
    idx = gt.extras["prompt"]
    pipe.scheduler = scheduler
    steps = nfe // scheduler.order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pipe(prompt_embeds=table["prompt_embeds"][idx],
                    pooled_prompt_embeds=table["pooled_prompt_embeds"][idx],
                    negative_prompt_embeds=table["negative_prompt_embeds"][idx],
                    negative_pooled_prompt_embeds=table["negative_pooled_prompt_embeds"][idx],
                    latents=gt.x0, guidance_scale=guidance, num_inference_steps=steps,
                    output_type="latent", height=16, width=16).images


def peer_schedulers(pipe):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
    shift = pipe.scheduler.config.shift
    flow = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=shift)
    return {"FlowMatchEuler": FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config),
            "DPM-Solver++(2M)": DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **flow),
            "UniPC": UniPCMultistepScheduler(**flow)}


def quality(nfe=10, num_gt=48, num_val=16, iters=60, finetune_iters=60, guidance=3.0, out_dir=None,
            bns_iters=30):
    pipe, table, model = sd3_setup(guidance=guidance)
    work = Path(out_dir or tempfile.mkdtemp())
    P = table["prompt_embeds"].shape[0]
    t0 = time.perf_counter()
    bf.generate_trajectories(model, num_gt, (4, 8, 8), work / "gt", extras_fn=bd.condition_extras(P),
                             batch_size=num_gt, progress=False, measure_interpolation=0)
    gt_seconds = time.perf_counter() - t0
    gt = bf.load_trajectories(work / "gt")
    _, val = gt.split(num_val)
    t0 = time.perf_counter()
    solver, report = bf.train(model, gt, base="rk2", n_steps=nfe // 2, iters=iters,
                              finetune_iters=finetune_iters, val=num_val, batch_size=16,
                              progress=False)
    fit_seconds = time.perf_counter() - t0
    rows = {}
    default = copy.deepcopy(pipe.scheduler)
    for name, sched in peer_schedulers(pipe).items():
        rows[name] = rmse_psnr(pipeline_sample(pipe, sched, table, val, guidance, nfe), val.x1)
    for name, spec in (("midpoint (ours, identity)", f"midpoint@{nfe}"), ("euler", f"euler@{nfe}")):
        rows[name] = {k: v for k, v in bf.evaluate(model, spec, val).items() if k in ("rmse", "psnr", "psnr_set")}
    rows["bespoke-rk2 (BespokeScheduler in pipe)"] = rmse_psnr(
        pipeline_sample(pipe, bd.BespokeScheduler.from_solver(solver), table, val, guidance, nfe), val.x1)
    # BNS started from that bespoke solver (the BNS trainer's default start), same pairs
    t0 = time.perf_counter()
    bns, _ = train_bns(model, gt, n_steps=nfe, init=solver, iters=bns_iters, adam_iters=bns_iters,
                       num_val=num_val, num_train=len(gt) - num_val, val_every=10,
                       budget_seconds=None, progress=False)
    bns_seconds = time.perf_counter() - t0
    rows["bns (BNSScheduler in pipe)"] = rmse_psnr(
        pipeline_sample(pipe, bd.BNSScheduler.from_solver(bns), table, val, guidance, nfe), val.x1)
    pipe.scheduler = default
    return {"nfe": nfe, "num_gt": num_gt, "num_val": num_val, "guidance_scale": guidance,
            "gt_seconds": gt_seconds, "fit_seconds": fit_seconds, "bns_fit_seconds": bns_seconds,
            "bns_iters": bns_iters, "rows": rows}, solver, (pipe, table, model, val)


def time_quantisation(solver, model, val):
    """PSNR of the solver with its model times rounded through bfloat16 (what Flux's
    ``t.to(latents.dtype)`` does to a bf16 pipeline's timesteps) against exact float32 times."""
    class Rounded(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x, t, **ex):   # timestep 1000 (1 - t) in bf16, back to t
            ts = ((1 - t) * 1000).to(torch.bfloat16).float()
            return self.m(x, 1 - ts / 1000, **ex)

    with torch.no_grad():
        exact = solver.sample(model, val.x0, **val.extras)
        rounded = solver.sample(Rounded(model), val.x0, **val.extras)
    return {"psnr_exact_vs_gt": rmse_psnr(exact, val.x1)["psnr"],
            "psnr_bf16_times_vs_gt": rmse_psnr(rounded, val.x1)["psnr"],
            "psnr_bf16_times_vs_exact": rmse_psnr(rounded, exact)["psnr"]}


def fast_vs_pipe(pipe, table, solver, guidance, batch=4, repeats=5):
    idx = torch.arange(batch) % table["prompt_embeds"].shape[0]
    kw = dict(prompt_embeds=table["prompt_embeds"][idx], pooled_prompt_embeds=table["pooled_prompt_embeds"][idx],
              negative_prompt_embeds=table["negative_prompt_embeds"][idx],
              negative_pooled_prompt_embeds=table["negative_pooled_prompt_embeds"][idx],
              latents=torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(7)),
              guidance_scale=guidance, height=16, width=16, output_type="latent")
    pipe.set_progress_bar_config(disable=True)
    fast = bd.fast_pipeline(pipe, solver, batch_size=batch)
    default = copy.deepcopy(pipe.scheduler)
    pipe.scheduler = bd.BespokeScheduler.from_solver(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = pipe(**kw).images
        b = fast(**kw).images

        def wall(fn):
            fn()
            t0 = time.perf_counter()
            for _ in range(repeats):
                fn()
            return (time.perf_counter() - t0) / repeats / batch

        ours_sched = wall(lambda: pipe(**kw))
        ours_fast = wall(lambda: fast(**kw))
        pipe.scheduler = default
        euler = wall(lambda: pipe(num_inference_steps=solver.nfe, **kw))
    return {"max_abs_diff_fast_vs_pipe": float((a - b).abs().max()),
            "bitwise_equal": bool(torch.equal(a, b)),
            "seconds_per_image": {"pipe + FlowMatchEuler (same NFE)": euler,
                                  "pipe + BespokeScheduler": ours_sched,
                                  "fast_pipeline": ours_fast},
            "batch": batch}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None, help="directory for diffusers_tiny.json/.md")
    p.add_argument("--nfe", type=int, default=10)
    args = p.parse_args()
    torch.set_num_threads(1)
    res, solver, (pipe, table, model, val) = quality(args.nfe)
    res["time_quantisation"] = time_quantisation(solver, model, val)
    res["fast_vs_pipe"] = fast_vs_pipe(pipe, table, solver, res["guidance_scale"])
    print(json.dumps(res, indent=1))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out / "diffusers_tiny.json", json.dumps(res, indent=1) + "\n")
        lines = [f"# Tiny SD3 pipeline (random weights, CFG {res['guidance_scale']}), NFE {res['nfe']}, "
                 f"{res['num_val']} held-out trajectories", "",
                 "| solver | RMSE | PSNR (dB) |", "|---|---|---|"]
        lines += [f"| {k} | {v['rmse']:.3e} | {v['psnr']:.2f} |" for k, v in res["rows"].items()]
        tq, fv = res["time_quantisation"], res["fast_vs_pipe"]
        lines += ["", f"bf16 time quantisation: PSNR vs GT {tq['psnr_exact_vs_gt']:.2f} -> "
                  f"{tq['psnr_bf16_times_vs_gt']:.2f} dB; rounded vs exact {tq['psnr_bf16_times_vs_exact']:.2f} dB",
                  f"fast path vs pipe(...) with BespokeScheduler: max |diff| {fv['max_abs_diff_fast_vs_pipe']:.2e}",
                  "", "| loop (batch %d, 1 thread) | s / image |" % fv["batch"], "|---|---|"]
        lines += [f"| {k} | {v * 1e3:.2f} ms |" for k, v in fv["seconds_per_image"].items()]
        atomic_write_text(args.out / "diffusers_tiny.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
