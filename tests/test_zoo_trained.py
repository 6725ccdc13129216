"""The bundled trained digits models (bespoke_fast/zoo/weights): loading, integrity, contract,
a short sample-quality check, and reproducibility of the training script."""
import shutil

import pytest
import torch

from bespoke_fast.solvers.fixed import solve
from bespoke_fast.zoo.quality import sample_stats
from bespoke_fast.zoo.trained import (TRAINED_NAMES, WEIGHTS_DIR, WeightsIntegrityError,
                                      load_trained)
from bespoke_fast.zoo.nets import DigitsMLP
from tests.helpers import one_thread  # noqa: F401  (a fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_BYTES = 2 * 1024 * 1024

# Measured (n=128, seed 0, local RK4 5 steps = 20 NFE; the JSON files hold the n=1000 RK4-50
# report): sample confidence 0.82 (eps) - 0.90 (fmot), real held-out digits 0.94; all 10 classes;
# nearest-train-image RMSE 0.26-0.34 vs 0.265 for held-out real digits, no near copies.
MIN_CONFIDENCE = 0.7
MIN_CLASSES = 8


@pytest.fixture(scope="module")
def models():
    return {name: load_trained(name) for name in TRAINED_NAMES}


@pytest.mark.parametrize("name", TRAINED_NAMES)
def test_bundled_model_loads(models, name):
    model, meta = models[name]
    wfile = WEIGHTS_DIR / f"{name}.safetensors"
    assert wfile.stat().st_size < MAX_BYTES
    assert meta["name"] == name and meta["weights_bytes"] == wfile.stat().st_size
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == meta["params"]
    expect = {"digits-fmot": ("fm-ot", "velocity", "flow"), "digits-vcs": ("cosine", "velocity", "flow"),
              "digits-eps": ("vp", "eps", "diffusion")}[name]
    assert (meta["path"], meta["prediction"], meta["time"]) == expect
    assert (model.path.name, model.prediction, model.time) == expect


def test_sha256_catches_corruption(tmp_path):
    name = "digits-fmot"
    for ext in ("json", "safetensors"):
        shutil.copy(WEIGHTS_DIR / f"{name}.{ext}", tmp_path / f"{name}.{ext}")
    load_trained(name, weights_dir=tmp_path)  # the intact copy loads
    w = tmp_path / f"{name}.safetensors"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match=r"(?s)digits-fmot\.safetensors.*"
                       r"python -m bespoke_fast\.zoo\.train --name digits-fmot"):
        load_trained(name, weights_dir=tmp_path)
    w.unlink()
    with pytest.raises(FileNotFoundError, match=r"digits-fmot\.safetensors.*--name digits-fmot"):
        load_trained(name, weights_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown trained model"):
        load_trained("digits-nope")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_dtype_and_finite(models, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=dtype)
    for name, (model, _) in models.items():
        for tv in torch.linspace(0, 1, 11, dtype=torch.float64).tolist():  # ends included
            t = torch.full((4,), tv, dtype=dtype)
            with torch.no_grad():
                u = model(x, t)
            assert u.shape == x.shape and u.dtype == dtype, name
            assert torch.isfinite(u).all(), (name, tv)


def test_net_dtypes_bf16():
    torch.manual_seed(0)
    net = DigitsMLP().eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    with torch.no_grad():
        y32 = net(x, t)
        y64 = net.double()(x.double(), t.double())
        yb = net.to(torch.bfloat16)(x.bfloat16(), t)
    assert y64.dtype == torch.float64 and yb.dtype == torch.bfloat16 and yb.shape == x.shape
    assert torch.allclose(y64.float(), y32, atol=1e-5)
    assert (yb.float() - y32).abs().max() < 0.05 * y32.abs().max() + 1e-3


def test_net_budget(models):
    # the demo fits a solver in minutes on 2 CPU cores: <= 0.8 MFLOP and <= 450k params per model
    for name, (model, meta) in models.items():
        net = DigitsMLP(**meta["net"]["config"])
        assert meta["net"]["class"] == "bespoke_fast.zoo.nets.DigitsMLP"
        assert meta["params"] == sum(p.numel() for p in net.parameters()) <= 450_000, name
        assert meta["flops_per_sample"] == net.flops_per_sample() <= 800_000, name


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_net_cuda_graph_capturable():
    net = DigitsMLP().cuda().eval()
    x, t = torch.randn(8, 1, 8, 8, device="cuda"), torch.rand(8, device="cuda")
    with torch.no_grad():
        ref = net(x, t)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            net(x, t)  # warm-up on a side stream
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = net(x, t)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, ref)


@pytest.mark.parametrize("name", TRAINED_NAMES)
def test_short_quality(models, name):
    model, _ = models[name]
    x0 = torch.randn(128, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x1 = solve(model, x0, method="rk4", n_steps=5)
    rep = sample_stats(x1)
    assert rep["classifier_heldout_accuracy"] > 0.9
    assert rep["confidence_samples_mean"] > MIN_CONFIDENCE, rep
    assert rep["classes_present"] >= MIN_CLASSES, rep
    # neither noise nor copies of the training set
    assert rep["nn_rmse_samples_to_train_mean"] < 2.0 * rep["nn_rmse_heldout_to_train_mean"], rep
    assert rep["frac_samples_near_copy"] < 0.2, rep


def test_training_reproducible():
    from bespoke_fast.zoo.train import train_model

    kw = dict(iters=3, batch_size=16, progress=False, eval_loss=False)
    a, sa = train_model("digits-eps", seed=1, **kw)
    b, _ = train_model("digits-eps", seed=1, **kw)
    c, _ = train_model("digits-eps", seed=2, **kw)
    sd_a, sd_b, sd_c = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    assert sa["iters"] == 3 and sa["seed"] == 1 and sa["params"] == sum(p.numel() for p in a.parameters())
