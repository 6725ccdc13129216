"""The bundled image model ``photo-32`` (a conv UNet trained on crops of bundled photos): loading
offline, integrity, the net's contract, evidence that it learned, every sampler kind and command
on it, the image statistics, the training script's reproducibility, and the fit report's error
maps for image and vector models. Small settings throughout (the file runs in seconds)."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import bespoke_fast as bf
from bespoke_fast import zoo
from bespoke_fast.engine import FastSampler
from bespoke_fast.solvers.fixed import solve
from bespoke_fast.zoo.nets import PhotoUNet
from bespoke_fast.zoo.photo_stats import channel_stats, compare, radial_power_spectrum
from bespoke_fast.zoo.trained import WEIGHTS_DIR, load_trained, verify_weights
from tests.helpers import one_thread  # noqa: F401  (a fixture)
from tests.test_engine import perturbed, perturbed_bns

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[1]
CURVE = ROOT / "bench" / "results" / "2026-12-04-cpu" / "photo-32" / "training_curve.json"
HAS_PHOTOS = all(importlib.util.find_spec(m) is not None for m in ("sklearn", "skimage"))
needs_photos = pytest.mark.skipif(not HAS_PHOTOS, reason="needs scikit-learn and scikit-image")


@pytest.fixture(scope="module")
def zm():
    return zoo.load("photo-32")


def _noise(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the bundled model
def test_loads_offline_as_a_trained_conv_net(zm):
    meta = verify_weights("photo-32")
    assert zm.shape == (3, 32, 32) and zm.data_range == 2.0 and zm.name == "photo-32"
    net = zm.model.net
    assert isinstance(net, PhotoUNet)
    assert sum(isinstance(m, torch.nn.Conv2d) for m in net.modules()) >= 8
    assert not zm.model.training and all(not p.requires_grad for p in zm.model.parameters())
    assert sum(p.numel() for p in net.parameters()) == meta["params"] <= 4_000_000
    wfile = WEIGHTS_DIR / meta["weights_file"]
    assert wfile.stat().st_size == meta["weights_bytes"] <= 12 * 1024 * 1024
    assert (meta["path"], meta["prediction"], meta["time"]) == ("fm-ot", "velocity", "flow")
    # trained: the zero-initialised output conv moved, and the run was a real one with a curve
    assert float(net.out.weight.abs().max()) > 1e-3
    tr = meta["training"]
    assert tr["iters"] >= 1000 and tr["ema_loss_heldout_photo"] < 0.5
    curve = json.loads(CURVE.read_text())
    assert curve["iters"] == tr["iters"] and curve["seed"] == tr["seed"]
    assert curve["evals"][-1]["heldout_photo"] == pytest.approx(tr["ema_loss_heldout_photo"])
    assert curve["evals"][-1]["heldout_photo"] < 0.8 * curve["evals"][0]["heldout_photo"] or \
        curve["evals"][-1]["heldout_photo"] < 0.3


def test_corrupted_weights_are_refused(tmp_path):
    for ext in ("json", "safetensors"):
        (tmp_path / f"photo-32.{ext}").write_bytes((WEIGHTS_DIR / f"photo-32.{ext}").read_bytes())
    load_trained("photo-32", weights_dir=tmp_path)
    w = tmp_path / "photo-32.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(bf.zoo.trained.WeightsIntegrityError, match="photo-32.safetensors"):
        load_trained("photo-32", weights_dir=tmp_path)


def test_net_contract_dtypes_and_time_forms():
    torch.manual_seed(0)
    net = PhotoUNet(width=8, depth_low=1, emb_dim=16, freq_dim=8)
    torch.nn.init.normal_(net.out.weight, std=0.1)          # not the zero output of a fresh net
    x = _noise(3)
    t = torch.full((3,), 0.3)
    y = net(x, t)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.abs().max() > 0
    torch.testing.assert_close(net(x, torch.tensor(0.3)), y)            # scalar t
    assert net(x.double(), t.double()).dtype == torch.float64           # computes in its own dtype
    assert net.to(torch.bfloat16)(x, t).dtype == torch.float32
    with pytest.raises(RuntimeError):
        net.float()(torch.randn(2, 3, 30, 30), torch.rand(2))          # 30 is not divisible by 4
    assert net.flops_per_sample() > 0 and net.config["width"] == 8


# ----------------------------------------------------------------------------- it learned
@needs_photos
def test_fm_loss_on_heldout_crops_beats_an_untrained_net(zm):
    from bespoke_fast.zoo.photos import fixed_crops, photo_split
    from bespoke_fast.zoo.train_photo import eval_fm_loss
    _, heldout = photo_split()
    x1 = fixed_crops(heldout, 64, 5)
    trained = eval_fm_loss(zm.model.net, x1, repeats=1)
    untrained = eval_fm_loss(PhotoUNet(**zm.model.net.config), x1, repeats=1)   # predicts 0
    assert trained < 0.4 * untrained


@needs_photos
def test_samples_have_the_heldout_spectrum_and_colours_not_the_noise(zm):
    from bespoke_fast.zoo.photos import fixed_crops, photo_split
    # Measured (seed 3, midpoint@8): spectrum 1.3 dB RMS from held-out crops (noise 15.9, other
    # real training crops 2.1); colours 0.22 from training crops (noise 0.98). The held-out
    # photo's colours differ from the training photos' (0.27 between the two real sets), so the
    # colours are compared with training crops, the spectrum with held-out ones.
    train, heldout = photo_split()
    x0 = _noise(32, seed=3)
    with torch.no_grad():
        samples = solve(zm.model, x0, "midpoint", n_steps=4)
    real, real_train = fixed_crops(heldout, 64, 6), fixed_crops(train, 64, 6)
    ours, noise = compare(samples, real), compare(x0, real)
    floor = compare(fixed_crops(train, 64, 7), real)["spectrum_db_rms"]
    assert ours["spectrum_db_rms"] < min(0.25 * noise["spectrum_db_rms"], 2 * floor)
    assert compare(samples, real_train)["channel_l2"] < 0.5 * compare(x0, real_train)["channel_l2"]


# ----------------------------------------------------------------------------- runs through everything
@pytest.mark.parametrize("kind", ["rk1", "rk2", "bns"])
def test_fast_sampler_every_kind_is_the_solver(zm, kind):
    solver = perturbed_bns(3) if kind == "bns" else perturbed(kind, 2)
    x0 = _noise(3, seed=1)
    sampler = FastSampler(zm.model, solver, zm.shape, batch_size=4, backend="reference")
    out = sampler(x0)
    with torch.no_grad():
        ref = solver.sample(zm.model, x0)
    assert out.shape == (3, 3, 32, 32) and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    report = bf.check_capturable(zm.model, solver, zm.shape)
    assert report.ok, str(report)


def test_cli_gt_train_eval_sample_doctor(tmp_path, capsys):
    from bespoke_fast.cli import main
    gt = tmp_path / "gt"
    assert main(["gt", "--model", "photo-32", "--num", "12", "--out", str(gt), "--batch-size", "12",
                 "--rtol", "1e-3", "--atol", "1e-3", "--quiet", "--device", "cpu"]) == 0
    solver = tmp_path / "s.json"
    assert main(["train", "--model", "photo-32", "--gt", str(gt), "--nfe", "4", "--iters", "2",
                 "--finetune-iters", "1", "--val", "4", "--init", "identity", "--polish-iters", "0",
                 "--out", str(solver), "--quiet", "--json", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", "photo-32", "--gt", str(gt), "--json", "--device", "cpu",
                 str(solver), "midpoint@4"]) == 0
    rows = json.loads(capsys.readouterr().out)["results"]
    assert [r["nfe"] for r in rows] == [4, 4] and all(r["psnr"] > 5 for r in rows)
    out = tmp_path / "samples"
    assert main(["sample", "--model", "photo-32", "--solver", str(solver), "--num", "3",
                 "--batch-size", "3", "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    assert any(out.iterdir())
    assert main(["doctor", "--model", "photo-32", "--solver", str(solver)]) == 0
    assert "capturable" in capsys.readouterr().out


@pytest.mark.slow
def test_fit_job_end_to_end_with_image_error_maps(tmp_path):
    pytest.importorskip("matplotlib")
    lines = []
    r = bf.fit("photo-32", out=tmp_path / "fit", nfe=4, num_train=24, num_heldout=8, iters=2,
               finetune_iters=1, batch_size=8, rtol=1e-3, atol=1e-3, budget_evals=12_000,
               progress=False, log=lines.append)
    assert r.report["evaluations"]["fit"] <= 12_000
    assert lines[0].startswith("plan: bespoke solver at NFE 4 for photo-32 (shape (3, 32, 32))")
    rows = r.report["heldout"]
    assert [x["solver"] for x in rows][:2] == ["bespoke-rk2@4", "euler@4"]
    assert all(x["n"] == 8 for x in rows)
    assert (tmp_path / "fit" / "error_maps.png").stat().st_size > 20000


# ----------------------------------------------------------------------------- image statistics
def test_spectrum_and_stats_known_answers():
    g = torch.Generator().manual_seed(0)
    white = torch.randn(256, 3, 32, 32, generator=g)
    p = radial_power_spectrum(white)
    assert p.shape == (16,) and torch.allclose(p, torch.ones(16, dtype=p.dtype), atol=0.08)
    d = compare(0.5 * white + 0.25, white)
    assert d["spectrum_db_rms"] == pytest.approx(6.0206, abs=1e-4)        # 10 log10(4)
    assert d["spectrum_db_high"] == pytest.approx(-6.0206, abs=1e-3)
    s = channel_stats(0.5 * white + 0.25)
    assert s["mean"] == pytest.approx([0.25] * 3, abs=0.01) and s["std"] == pytest.approx([0.5] * 3, abs=0.01)
    # smoothing removes high frequencies: the high rings lose power
    blur = torch.nn.functional.avg_pool2d(white, 3, stride=1, padding=1, count_include_pad=False)
    assert compare(blur, white)["spectrum_db_high"] < -5
    assert compare(white, white)["spectrum_db_rms"] == 0.0


@pytest.mark.parametrize("bad,match", [(torch.zeros(3, 32, 32), r"\[N, C, H, W\]"),
                                       (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
                                       (torch.zeros(2, 3, 8, 8, dtype=torch.long), r"\[N, C, H, W\]")])
def test_stats_refuse_bad_input(bad, match):
    with pytest.raises(ValueError, match=match):
        radial_power_spectrum(bad)


def test_compare_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        compare(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 16, 16))


# ----------------------------------------------------------------------------- training and data
@needs_photos
def test_split_holds_out_a_photo_and_regions_and_crops_are_in_range():
    from bespoke_fast.zoo.photos import HELDOUT_PHOTOS, photo_split, random_crops
    train, heldout = photo_split()
    assert not any(lab.split("@")[0] in HELDOUT_PHOTOS for lab, _ in train)
    assert any(lab.startswith("coffee@") for lab, _ in heldout)
    assert {lab.split("[")[0] for lab, _ in train} == {"china", "flower", "astronaut", "chelsea",
                                                       "rocket", "motorcycle_left"}
    x = random_crops(train, 16, torch.Generator().manual_seed(0))
    assert x.shape == (16, 3, 32, 32) and x.min() >= -1 and x.max() <= 1 and x.std() > 0.1


@needs_photos
def test_training_is_reproducible(tmp_path):
    from bespoke_fast.zoo.train_photo import save_photo_model, train_photo
    kw = dict(iters=2, eval_every=2, eval_n=4, log=lambda *_: None,
              net_config=dict(width=8, depth_low=1, emb_dim=16, freq_dim=8))
    a, sa = train_photo(seed=3, curve_dir=tmp_path / "a", **kw)
    b, _ = train_photo(seed=3, **kw)
    c, _ = train_photo(seed=4, **kw)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    assert any(not torch.equal(v, c.state_dict()[k]) for k, v in a.state_dict().items())
    assert json.loads((tmp_path / "a" / "training_curve.json").read_text())["evals"][0]["iter"] == 2
    jpath = save_photo_model(a, sa, tmp_path / "w")
    model, meta = load_trained("photo-32", weights_dir=tmp_path / "w")
    assert meta["sha256"] and model.net.config["width"] == 8


# ----------------------------------------------------------------------------- error maps
def _capture_figure(monkeypatch):
    from bespoke_fast.fitting import plots
    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figs.append(fig) or Path(path))
    return plots, figs


def test_error_maps_for_images_name_solver_nfe_psnr_model_and_label_the_colour_bar(monkeypatch):
    pytest.importorskip("matplotlib")
    plots, figs = _capture_figure(monkeypatch)
    gt = torch.rand(4, 3, 8, 8) * 2 - 1
    plots.plot_error_maps("e.png", gt, {"bespoke-rk2@10": gt + 0.01, "midpoint@10": gt - 0.1}, 2.0,
                          model_name="photo-32")
    fig = figs[0]
    assert fig._suptitle.get_text().startswith("photo-32:")
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert sum("GT sample" in t for t in titles) == 4
    assert sum("bespoke-rk2, NFE 10\nPSNR 46.0 dB" in t for t in titles) == 8   # sample + error rows
    assert sum("midpoint, NFE 10\nPSNR 26.0 dB" in t for t in titles) == 8
    assert any("|x - x_GT|" in ax.get_ylabel() for ax in fig.axes if not ax.get_title())  # colour bar


def test_error_maps_for_vectors_are_a_scatter_and_a_histogram_not_lines(monkeypatch):
    pytest.importorskip("matplotlib")
    plots, figs = _capture_figure(monkeypatch)
    gt = torch.randn(64, 2)
    plots.plot_error_maps("e.png", gt, {"bespoke-rk2@6": gt + 0.01, "midpoint@6": gt + 0.05}, 2.0,
                          n=64, model_name="mine:two_d")
    fig = figs[0]
    assert "mine:two_d" in fig._suptitle.get_text()
    scatter_axes = fig.axes[:2]
    for ax, name in zip(scatter_axes, ("bespoke-rk2, NFE 6", "midpoint, NFE 6")):
        assert name in ax.get_title() and "PSNR" in ax.get_title()
        assert len(ax.collections) == 1 and ax.collections[0].get_offsets().shape == (128, 2)
        assert len(ax.lines) == 1                                      # only the y = x guide
    assert fig.axes[2].get_xscale() == "log" and len(fig.axes[2].patches) == 2


# ----------------------------------------------------------------------------- the demo's budget
def test_demo_scales_its_trajectories_to_the_budget():
    from bespoke_fast.demo import _sizes_within_budget
    lines = []
    kw = dict(nfe=4, seed=0, iters=2, finetune_iters=1, device=torch.device("cpu"), log=lines.append)
    assert _sizes_within_budget("photo-32", num_gt=200, num_val=100, budget_seconds=1e6, **kw) == (200, 100)
    assert lines == []
    gt, val = _sizes_within_budget("photo-32", num_gt=160, num_val=1024, budget_seconds=1.0, **kw)
    assert (gt, val) == (96, 64)                                  # the floors
    assert "using 96 + 64 to fit the 1 s budget" in lines[0]
