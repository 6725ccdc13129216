"""diffusers integration on tiny random-weight pipelines, CPU, offline (seconds each).

Pipelines: SD3 with classifier-free guidance, Flux with embedded guidance, DDPM with eps and
v prediction (UNet2DModel). Text encoders are None: prompt embeddings and latents are passed.

Which of diffusers' ``SchedulerCommonTest`` checks apply (read from diffusers'
tests/schedulers/test_schedulers.py) and where they are here:

* check_over_configs / check_over_forward / test_from_save_pretrained: a config saved and
  reloaded gives the same step output -> ``test_scheduler_config_round_trip``.
* test_from_pretrained: the reloaded config equals the saved one -> same test.
* test_step_shape, test_scheduler_outputs_equivalence (tuple == dict output),
  test_scheduler_public_api (init_noise_sigma, scale_model_input keeps the shape),
  test_add_noise_device, determinism -> ``test_scheduler_contract``.
* test_deprecated_kwargs (no ``**kwargs`` in ``__init__`` without ``_deprecated_kwargs``) and
  test_getattr_is_correct (config attributes via ConfigMixin) -> ``test_scheduler_contract``.
* ``set_timesteps`` on each device: CPU here (no GPU in CI), the timesteps follow ``device``.

Not applicable: test_compatibles / save_load_compatible_schedulers (a fitted solver cannot be
rebuilt from another scheduler's config, so ``_compatibles`` is empty), test_trained_betas (no
betas: the schedule is the fitted times), push_to_hub tests (network), and the timestep-value
checks of individual schedulers (our timesteps are the learned times, checked against our own
sampler instead).
"""
import inspect
import json
import warnings

import pytest
import torch

import bespoke_fast as bf

pytest.importorskip("transformers")
bd = pytest.importorskip("bespoke_fast.integrations.diffusers")


def _table(p=2, seed=1, negatives=True):
    g = torch.Generator().manual_seed(seed)
    t = {"prompt_embeds": torch.randn(p, 5, 16, generator=g),
         "pooled_prompt_embeds": torch.randn(p, 8, generator=g)}
    if negatives:
        t["negative_prompt_embeds"] = torch.randn(p, 5, 16, generator=g)
        t["negative_pooled_prompt_embeds"] = torch.randn(p, 8, generator=g)
    return t


def _fitted_like(base="rk2", n=3):
    """A non-identity solver: non-uniform times, scales != 1 (as a fitted one would have)."""
    m = n if base == "rk1" else 2 * n
    r = torch.linspace(0, 1, m + 1, dtype=torch.float64)
    return bf.BespokeSolver.from_tables(base, t=r ** 1.3, tdot=1.3 * r[:-1].clamp(min=0.05) ** 0.3,
                                        s=1 + 0.1 * r, sdot=torch.full((m,), 0.1, dtype=torch.float64))


def _bns(n=4):
    s = bf.NonStationarySolver(n, init="midpoint")
    with torch.no_grad():
        s.theta_t.add_(torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
        s.theta_b.mul_(1.05)
    return s


def _latents(shape, b=2, seed=2):
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- conventions
@pytest.mark.parametrize("path", ["fm-ot", "cosine", "vp"])
def test_as_velocity_v_prediction_recovers_the_exact_velocity(path):
    from tests.helpers import noise, smooth_gmm
    flow = smooth_gmm(path=path)
    x, t = noise(6, 8), torch.linspace(0.1, 0.9, 6, dtype=torch.float64)
    vel = bf.as_velocity(lambda x, t: flow.predict(x, t, "v"), prediction="v", path=path)
    torch.testing.assert_close(vel(x, t), flow(x, t), rtol=1e-9, atol=1e-9)


def test_velocity_model_sign_and_time_convention():
    pipe = bd.tiny_pipeline("sd3")
    tab = _table(negatives=False)
    model = bd.velocity_model(pipe, **tab)
    x, t = _latents((4, 8, 8)), torch.tensor([0.25, 0.75])
    with torch.no_grad():
        out = pipe.transformer(hidden_states=x, timestep=1000 * (1 - t), return_dict=False,
                               encoder_hidden_states=tab["prompt_embeds"],
                               pooled_projections=tab["pooled_prompt_embeds"])[0]
        assert torch.equal(model(x, t, prompt=torch.arange(2)), -out)
    with pytest.raises(ValueError, match="needs prediction="):
        bd.velocity_model(bd.tiny_pipeline("ddpm-eps").unet)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        bd.velocity_model(pipe, guidance_scale=3.0, **tab)


# ----------------------------------------------------------------------------- scheduler == sampler
def _sd3_pipe_vs_ours(scheduler_cls, solver, guidance=3.0):
    pipe, tab = bd.tiny_pipeline("sd3"), _table()
    model = bd.velocity_model(pipe, guidance_scale=guidance, **tab)   # before the swap: FlowMatch config
    lat = _latents((4, 8, 8))
    pipe.scheduler = scheduler_cls.from_solver(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(latents=lat, guidance_scale=guidance, output_type="latent", height=16, width=16,
                   **tab).images
    with torch.no_grad():
        ours = solver.sample(model, lat, prompt=torch.arange(2))
    return pipe, tab, lat, out, ours


@pytest.mark.parametrize("kind", ["rk2", "rk1", "bns"])
def test_sd3_cfg_pipeline_with_our_scheduler_equals_our_sampler(kind):
    solver = _bns() if kind == "bns" else _fitted_like(kind)
    cls = bd.BNSScheduler if kind == "bns" else bd.BespokeScheduler
    _, _, _, out, ours = _sd3_pipe_vs_ours(cls, solver)
    assert torch.equal(out, ours)      # float32, same arithmetic: bitwise


def test_flux_embedded_guidance_pipeline_equals_our_sampler():
    pipe, tab, solver = bd.tiny_pipeline("flux"), _table(negatives=False), _fitted_like()
    with torch.no_grad():
        lat, img_ids = pipe.prepare_latents(2, 4, 16, 16, torch.float32, "cpu",
                                            torch.Generator().manual_seed(0))
    model = bd.velocity_model(pipe, guidance_scale=3.5, img_ids=img_ids, **tab)
    pipe.scheduler = bd.BespokeScheduler.from_solver(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(latents=lat, guidance_scale=3.5, height=16, width=16, output_type="latent",
                   **tab).images
    with torch.no_grad():
        ours = solver.sample(model, lat, prompt=torch.arange(2))
        assert not torch.equal(ours, solver.sample(model, lat, prompt=torch.arange(2),
                                                   guidance=torch.full((2,), 1.0)))
    assert torch.equal(out, ours)


@pytest.mark.parametrize("kind", ["ddpm-eps", "ddpm-v"])
def test_unet_pipeline_with_our_scheduler_equals_our_sampler(kind):
    pipe, solver = bd.tiny_pipeline(kind), _fitted_like()
    model = bd.velocity_model(pipe)
    assert model.conversion["prediction_type"] == pipe.scheduler.config.prediction_type
    pipe.scheduler = bd.BespokeScheduler.from_solver(solver, like=pipe.scheduler)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    from diffusers.utils.torch_utils import randn_tensor
    x0 = randn_tensor((2, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = (solver.sample(model, x0) / 2 + 0.5).clamp(0, 1)
    assert torch.equal(out, ours)


@pytest.mark.parametrize("base", ["rk2", "rk1"])
def test_identity_solver_is_plain_midpoint_or_euler(base):
    pipe, tab = bd.tiny_pipeline("sd3"), _table()
    model = bd.velocity_model(pipe, guidance_scale=2.0, **tab)
    lat = _latents((4, 8, 8))
    pipe.scheduler = bd.BespokeScheduler.from_solver(bf.BespokeSolver(base, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = pipe(latents=lat, guidance_scale=2.0, output_type="latent", height=16, width=16,
                   **tab).images
    with torch.no_grad():
        ref = bf.solve(model, lat, "midpoint" if base == "rk2" else "euler", n_steps=3,
                       prompt=torch.arange(2))
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------- scheduler API
@pytest.mark.parametrize("cls,solver", [(None, "rk2"), (None, "bns")])
def test_scheduler_config_round_trip(tmp_path, cls, solver):
    s = _bns() if solver == "bns" else _fitted_like()
    cls = bd.BNSScheduler if solver == "bns" else bd.BespokeScheduler
    sched = cls.from_solver(s)
    sched.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert stored["solver"]["parameters"] == s.raw_parameters()   # the fitted numbers
    again = cls.from_pretrained(tmp_path)
    assert {k: v for k, v in sched.config.items() if k != "_use_default_values"} == dict(again.config)
    for name, p in s.named_parameters():
        assert torch.equal(getattr(again.solver, name), p)
    assert torch.equal(again.timesteps, sched.timesteps)
    x, out = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(sched.step(out, sched.timesteps[0], x).prev_sample,
                       again.step(out, again.timesteps[0], x).prev_sample)


@pytest.mark.parametrize("solver", ["rk2", "bns"])
def test_scheduler_contract(solver):
    cls = bd.BNSScheduler if solver == "bns" else bd.BespokeScheduler
    sched = cls.from_solver(_bns() if solver == "bns" else _fitted_like())
    assert sched.init_noise_sigma == 1.0 and sched.compatibles == []
    params = inspect.signature(cls.__init__).parameters
    assert "kwargs" not in params and not cls._deprecated_kwargs
    x = torch.randn(2, 4, 8, 8)
    assert sched.scale_model_input(x, 0.0).shape == x.shape
    sched.set_timesteps(device="cpu")
    d = sched.step(0.1 * x, sched.timesteps[0], x)
    sched.set_timesteps()
    tup = sched.step(0.1 * x, sched.timesteps[0], x, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], d.prev_sample)   # determinism too
    second = sched.step(0.1 * x, sched.timesteps[1], d.prev_sample).prev_sample
    assert second.shape == x.shape and second.dtype == x.dtype
    half = sched.step(0.1 * x.half(), sched.timesteps[2], second.half()).prev_sample
    assert half.dtype == torch.float16 and sched._x.dtype == torch.float32   # fp32 state inside
    assert sched.add_noise(x, torch.randn_like(x), sched.timesteps[1][None]).shape == x.shape
    assert sched.config.prediction_type == "flow" and len(sched) == 1000
    with pytest.raises(ValueError, match="begin_index"):
        sched.set_begin_index(len(sched.timesteps))


def test_scheduler_ignores_pipeline_schedule_with_one_warning():
    sched = bd.BespokeScheduler.from_solver(_fitted_like())
    before = sched.timesteps.clone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sched.set_timesteps(28, sigmas=[1.0, 0.5], mu=0.7)
        sched.set_timesteps(50)
    assert [str(w.message) for w in caught if "ignored" in str(w.message)].__len__() == 1
    assert torch.equal(sched.timesteps, before) and sched.order == 1   # 50 != n: bar ticks per call
    sched.set_timesteps(3)
    assert sched.order == 2                                              # n steps: ticks per step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bd.BespokeScheduler.from_solver(_fitted_like()).set_timesteps(3)   # its own n: quiet
    assert not caught


@pytest.mark.parametrize("solver", ["rk2", "bns"])
def test_step_makes_no_host_syncs(monkeypatch, solver):
    cls = bd.BNSScheduler if solver == "bns" else bd.BespokeScheduler
    sched = cls.from_solver(_bns() if solver == "bns" else _fitted_like())
    x = torch.randn(2, 4, 8, 8)
    sched.set_timesteps()
    sched.set_begin_index(0)
    n = len(sched.timesteps)
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        def trap(*a, _n=name, **k):
            raise AssertionError(f"host sync via Tensor.{_n} inside step()")
        monkeypatch.setattr(torch.Tensor, name, trap)
    for k in range(n):
        x = sched.step(0.1 * x, sched.timesteps[k], x).prev_sample
    monkeypatch.undo()
    with pytest.raises(IndexError, match="set_timesteps"):
        sched.step(x, 0, x)


# ----------------------------------------------------------------------------- fast path
def test_fast_path_equals_scheduler_path_sd3():
    solver = _fitted_like()
    pipe, tab, lat, out, _ = _sd3_pipe_vs_ours(bd.BespokeScheduler, solver)
    fast = bd.fast_pipeline(pipe, solver, batch_size=2)
    got = fast(latents=lat, guidance_scale=3.0, output_type="latent", height=16, width=16, **tab).images
    # the fused guidance op forms u_unc + w (u_cond - u_unc) with addcmul (one rounding less
    # than the pipeline's expression), so equal to float32 rounding, not bitwise
    torch.testing.assert_close(got, out, rtol=1e-5, atol=1e-5)
    img = fast(latents=lat, guidance_scale=3.0, output_type="pt", height=16, width=16, **tab)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pipe(latents=lat, guidance_scale=3.0, output_type="pt", height=16, width=16, **tab)
    assert type(img) is type(ref) and img.images.shape == ref.images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(img.images, ref.images, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,solver", [("flux", "rk2"), ("flux", "bns"), ("ddpm-eps", "rk2")])
def test_fast_path_equals_scheduler_path_bitwise(kind, solver):
    pipe = bd.tiny_pipeline(kind)
    solver, cls = (_bns(), bd.BNSScheduler) if solver == "bns" else (_fitted_like(), bd.BespokeScheduler)
    fast = bd.fast_pipeline(pipe, solver, batch_size=2)
    if kind == "flux":
        kw = dict(guidance_scale=3.5, height=16, width=16, output_type="latent", **_table(negatives=False))
        pipe.scheduler = cls.from_solver(solver)
    else:
        kw = dict(batch_size=2, output_type="pt")
        pipe.scheduler = cls.from_solver(solver, like=pipe.scheduler)
    got = fast(generator=torch.Generator().manual_seed(0), **kw).images
    again = fast(generator=torch.Generator().manual_seed(0), **kw).images    # sampler reused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.equal(got, ref) and torch.equal(again, ref)


# ----------------------------------------------------------------------------- conditional GT, fit
@pytest.mark.slow
def test_fit_on_tiny_sd3_beats_diffusers_schedulers_at_nfe10(tmp_path):
    """Conditional GT over 4 prompts with CFG 3, a bespoke RK2 fit (few iterations), then pipe(...)
    with FlowMatchEuler, DPM-Solver++(2M), UniPC and our scheduler on held-out trajectories."""
    from bench.diffusers_tiny import quality
    res, solver, _ = quality(nfe=10, num_gt=48, num_val=16, iters=30, finetune_iters=30,
                             out_dir=tmp_path, bns_iters=10)   # BNS needs >= 16 validation pairs
    gt = bf.load_trajectories(tmp_path / "gt")
    assert gt.extras["prompt"].tolist() == [i % 4 for i in range(48)]   # stored conditioning
    rows = res["rows"]
    ours = rows["bespoke-rk2 (BespokeScheduler in pipe)"]["psnr"]
    for peer in ("FlowMatchEuler", "DPM-Solver++(2M)", "UniPC"):
        assert ours > rows[peer]["psnr"], (peer, rows)
    # BNS starts from that solver and keeps its best validation (these very pairs): never worse,
    # up to the scheduler's float32 arithmetic
    assert rows["bns (BNSScheduler in pipe)"]["psnr"] >= ours - 0.05, rows


def test_capture_checker_passes_on_tiny_denoisers():
    """Everything the models hold (prompt tables, Flux ids and guidance) is a buffer, so it moves
    with the model; the capture checker (issue 11) runs the captured loop on the meta device."""
    flux = bd.tiny_pipeline("flux")
    lat, ids = flux.prepare_latents(2, 4, 16, 16, torch.float32, "cpu", torch.Generator())
    cases = [(bd.velocity_model(bd.tiny_pipeline("sd3"), guidance_scale=3.0, **_table()), (4, 8, 8),
              {"prompt": torch.arange(2)}),
             (bd.velocity_model(flux, guidance_scale=3.5, img_ids=ids, **_table(negatives=False)),
              tuple(lat.shape[1:]), {"prompt": torch.arange(2)}),
             (bd.velocity_model(bd.tiny_pipeline("ddpm-eps")), (3, 8, 8), {})]
    names = dict(cases[1][0].named_buffers())
    assert {"raw.guidance", "raw.img_ids", "raw.txt_ids", "raw.prompt_embeds"} <= set(names)
    check = getattr(bf, "check_capturable", None)
    if check is None:
        pytest.skip("bespoke_fast.check_capturable (issue 11) is not on this branch yet")
    for model, shape, extras in cases:
        for solver in (_fitted_like(), _bns()):
            report = check(model, solver, shape, batch_size=2, **extras)
            assert report.ok, str(report)


def test_cli_gt_train_eval_on_a_local_pipeline_folder(tmp_path, capsys):
    """--model diffusers:DIR with --prompts FILE: conditional GT stores each trajectory's prompt
    index and the table; train and eval read the table back from the GT directory."""
    from bespoke_fast.cli import main
    bd.tiny_pipeline("sd3").save_pretrained(tmp_path / "pipe")
    bd.save_conditioning(tmp_path / "prompts.safetensors", _table(p=3))
    spec = f"diffusers:{tmp_path / 'pipe'}"
    assert main(["gt", "--model", spec, "--prompts", str(tmp_path / "prompts.safetensors"),
                 "--guidance-scale", "2.0", "--num", "12", "--batch-size", "12", "--knots", "9",
                 "--rtol", "1e-3", "--atol", "1e-3", "--out", str(tmp_path / "gt"), "--quiet"]) == 0
    gt = bf.load_trajectories(tmp_path / "gt")
    assert gt.extras["prompt"].tolist() == [i % 3 for i in range(12)]
    stored = bd.load_conditioning(tmp_path / "gt" / bd.CONDITIONING_FILE)
    assert torch.equal(stored["prompt_embeds"], _table(p=3)["prompt_embeds"])
    assert float(stored["guidance_scale"]) == 2.0
    assert main(["train", "--model", spec, "--gt", str(tmp_path / "gt"), "--nfe", "4", "--iters", "2",
                 "--finetune-iters", "1", "--val", "4", "--batch-size", "4",
                 "--out", str(tmp_path / "s.json"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", spec, "--gt", str(tmp_path / "gt"), "--json",
                 str(tmp_path / "s.json"), "midpoint@4"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert len(results) == 2 and all(r["psnr"] > 20 for r in results)
    assert main(["gt", "--model", f"diffusers:{tmp_path / 'nope'}", "--num", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["gt", "--model", spec, "--num", "2", "--out", str(tmp_path / "x")]) == 2
    (tmp_path / "prompts.txt").write_text("a cat\n")
    capsys.readouterr()
    assert main(["gt", "--model", spec, "--prompts", str(tmp_path / "prompts.txt"), "--num", "2",
                 "--out", str(tmp_path / "x")]) == 2        # no text encoder in the tiny pipeline
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bespoke-fast gt: error:") and "no text encoder" in err


def test_cli_class_conditional_unet_with_guidance(tmp_path):
    """--classes on a class-conditional UNet: labels stored per trajectory, CFG against the
    'no class' embedding, and train/eval reading labels and scale back from the GT directory."""
    from bespoke_fast.cli import main
    pipe = bd.tiny_pipeline("ddpm-class")
    pipe.save_pretrained(tmp_path / "pipe")
    spec = f"diffusers:{tmp_path / 'pipe'}"
    assert main(["gt", "--model", spec, "--classes", "3", "--guidance-scale", "2", "--num", "6",
                 "--batch-size", "6", "--knots", "9", "--rtol", "1e-3", "--atol", "1e-3",
                 "--out", str(tmp_path / "gt"), "--quiet"]) == 0
    gt = bf.load_trajectories(tmp_path / "gt")
    assert gt.extras["class_labels"].tolist() == [0, 1, 2, 0, 1, 2]
    model = bd.velocity_model(pipe, guidance_scale=2.0, null_class=3)
    k, y = 4, gt.extras["class_labels"]               # the stored velocity at a knot is the
    t = gt.knots_t[k].float().expand(len(gt))         # guided velocity of the stored label
    with torch.no_grad():
        u = model(gt.knots_x[:, k], t, class_labels=y)
        torch.testing.assert_close(u, gt.knots_u[:, k], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model.model(gt.knots_x[:, k], t, class_labels=y), u, atol=1e-3)
    assert main(["eval", "--model", spec, "--gt", str(tmp_path / "gt"), "--quiet", "euler@4"]) == 0
    assert main(["gt", "--model", spec, "--classes", "4", "--guidance-scale", "2", "--num", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert main(["sample", "--model", spec, "--solver", "s.json", "--num", "2",
                 "--out", str(tmp_path / "y")]) == 2


def test_scheduler_rejects_the_other_solver_kind():
    with pytest.raises(ValueError, match="use BNSScheduler"):
        bd.BespokeScheduler.from_solver(_bns())
    with pytest.raises(ValueError, match="use BespokeScheduler"):
        bd.BNSScheduler.from_solver(_fitted_like())


def test_bf16_pipeline_keeps_float32_state_and_time():
    """A bf16 SD3 pipeline with our scheduler: float32 state and timesteps inside, bf16 latents
    out, close to the float32 run; the bf16 fast path agrees with it to bf16 rounding."""
    solver, tab = _fitted_like(), _table()
    kw = dict(guidance_scale=3.0, output_type="latent", height=16, width=16)
    pipe = bd.tiny_pipeline("sd3")
    lat = _latents((4, 8, 8))
    pipe.scheduler = bd.BespokeScheduler.from_solver(solver)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pipe(latents=lat, **kw, **tab).images
        pipe.to(torch.bfloat16)
        half = {k: v.bfloat16() for k, v in tab.items()}
        out = pipe(latents=lat.bfloat16(), **kw, **half).images
    assert out.dtype == torch.bfloat16 and pipe.scheduler._x.dtype == torch.float32
    assert pipe.scheduler.timesteps.dtype == torch.float32
    assert bf.metrics.rmse_psnr(out.float(), ref)["psnr"] > 30
    fast = bd.fast_pipeline(pipe, solver, batch_size=2)
    assert fast.model_dtype == torch.bfloat16
    got = fast(latents=lat.bfloat16(), **kw, **half).images
    assert bf.metrics.rmse_psnr(got.float(), out.float())["psnr"] > 35
    with pytest.raises(ValueError, match="skip_guidance_layers"):
        fast(latents=lat, skip_guidance_layers=[0], **kw, **half)
    with pytest.raises(TypeError, match="unexpected"):
        fast(latents=lat, guidance=2.0, **half)


def test_pipeline_save_pretrained_keeps_our_scheduler(tmp_path):
    import diffusers
    pipe, solver = bd.tiny_pipeline("sd3"), _fitted_like()
    pipe.scheduler = bd.BespokeScheduler.from_solver(solver)
    pipe.save_pretrained(tmp_path)
    none = {k: None for k in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                              "text_encoder_3", "tokenizer_3")}
    again = diffusers.DiffusionPipeline.from_pretrained(tmp_path, **none).scheduler
    assert type(again) is bd.BespokeScheduler
    assert torch.equal(again.timesteps, pipe.scheduler.timesteps)


def _bar_of(pipe, **kwargs):
    """Run ``pipe`` and return ``(total, n)`` of its progress bar, read from the bar itself."""
    import io
    bars, make = [], pipe.progress_bar

    def recording(*a, **k):
        bars.append(make(*a, **k))
        return bars[-1]
    pipe.progress_bar = recording
    pipe.set_progress_bar_config(file=io.StringIO())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe(output_type="latent", height=16, width=16, **kwargs)
    assert len(bars) == 1
    return (bars[0].total, bars[0].n), [str(w.message) for w in caught]


@pytest.mark.parametrize("kind", ["rk2", "rk1", "bns"])
def test_the_pipeline_progress_bar_counts_the_steps_that_run(kind):
    solver = _bns() if kind == "bns" else _fitted_like(kind)
    cls = bd.BNSScheduler if kind == "bns" else bd.BespokeScheduler
    n, nfe = solver.n_steps, solver.nfe
    # SD3 passes num_inference_steps: the bar's total is that number, as the caller gave it
    for steps, want in ((n, (n, n)), (nfe, (nfe, nfe)), (nfe - 1, (nfe - 1, nfe - 1)),
                        (28, (28, nfe))):
        pipe, tab = bd.tiny_pipeline("sd3"), _table()
        pipe.scheduler = cls.from_solver(solver)
        bar, caught = _bar_of(pipe, latents=_latents((4, 8, 8)), guidance_scale=3.0,
                              num_inference_steps=steps, **tab)
        assert bar == want, (steps, bar)
        warned = [m for m in caught if "progress bar" in m]
        assert bool(warned) == (steps not in (n, nfe)), (steps, caught)
        if warned:
            assert f"pass num_inference_steps={n}" in warned[0]
            assert (f"or {nfe} (model calls)" in warned[0]) == (nfe != n)
    # Flux passes sigmas: the total is len(timesteps), the NFE, whatever num_inference_steps is
    pipe, tab = bd.tiny_pipeline("flux"), _table(negatives=False)
    with torch.no_grad():
        lat, _ = pipe.prepare_latents(2, 4, 16, 16, torch.float32, "cpu",
                                      torch.Generator().manual_seed(0))
    pipe.scheduler = cls.from_solver(solver)
    for steps in (28, n):
        bar, caught = _bar_of(pipe, latents=lat, guidance_scale=3.5, num_inference_steps=steps,
                              **tab)
        assert bar == (nfe, nfe), (steps, bar)
        assert not [m for m in caught if "progress bar" in m]


@pytest.mark.parametrize("kind", ["rk2", "bns"])
def test_the_pipeline_progress_bar_text_ends_at_100_percent(kind):
    import io
    solver = _bns() if kind == "bns" else _fitted_like(kind)
    cls = bd.BNSScheduler if kind == "bns" else bd.BespokeScheduler
    pipe, tab = bd.tiny_pipeline("sd3"), _table()
    pipe.scheduler = cls.from_solver(solver)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.scheduler.set_timesteps(28)
    assert f"pass num_inference_steps={solver.n_steps}" in str(caught[0].message)
    sink = io.StringIO()
    pipe.set_progress_bar_config(file=sink, ncols=80)
    pipe(latents=_latents((4, 8, 8)), guidance_scale=3.0, output_type="latent", height=16,
         width=16, num_inference_steps=solver.n_steps, **tab)
    last = sink.getvalue().replace("\r", "\n").strip().splitlines()[-1]
    assert f"{solver.n_steps}/{solver.n_steps}" in last and "100%" in last, last
