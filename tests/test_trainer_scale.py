"""The trainer at scale: micro-batching (gradient accumulation), activation checkpointing and
model autocast change memory, not the result."""
import pytest
import torch

import bespoke_fast as bf
from bespoke_fast.solvers.bespoke import BespokeSolver
from bespoke_fast.fitting.bespoke import loss_backward, model_for_loss
from tests.helpers import perturbed


@pytest.fixture(scope="module")
def gt64(tmp_path_factory):
    """A float64 GT set of the exact gmm-64 flow (float64 all through: rounding is ~1e-16)."""
    zm = bf.zoo.load("gmm-64")
    model = zm.model.double()
    out = tmp_path_factory.mktemp("gt64")
    bf.generate_trajectories(model, 24, zm.shape, out, knots=11, dtype=torch.float64, rtol=1e-8,
                             atol=1e-8, batch_size=12, progress=False, measure_interpolation=0)
    return model, bf.load_trajectories(out)


def _perturbed_solver(n_steps=3):
    return perturbed(BespokeSolver("rk2", n_steps).double(), seed=3, scale=0.05)


def _grads(solver, model, batch, phase, **kw):
    solver.zero_grad(set_to_none=True)
    loss, nfe = loss_backward(solver, model, batch, phase, **kw)
    return loss, nfe, [p.grad.clone() for p in solver.parameters()]


@pytest.mark.parametrize("phase", ["bound", "finetune"])
def test_micro_batches_give_the_full_batch_gradient_in_float64(gt64, phase):
    model, gt = gt64
    batch = gt.subset(range(17))
    solver = _perturbed_solver()
    loss, nfe, full = _grads(solver, model, batch, phase)
    for micro in (5, 1):          # uneven chunks (5, 5, 5, 2) and one trajectory at a time
        loss_m, nfe_m, parts = _grads(solver, model, batch, phase, micro_batch=micro)
        assert nfe_m == nfe
        torch.testing.assert_close(loss_m, loss, rtol=1e-13, atol=0)
        for a, b in zip(parts, full):   # float64 rounding (cancellation in the sums): ~1e-12
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11 * float(b.abs().max()))
    # a micro-batch as large as the batch is the plain path, bit for bit
    _, _, same = _grads(solver, model, batch, phase, micro_batch=17)
    assert all(torch.equal(a, b) for a, b in zip(same, full))


def test_checkpointing_and_micro_batching_train_to_the_plain_parameters(gt64):
    model, gt = gt64
    # no polish: L-BFGS's line search would amplify the rounding differences of the chunked sums
    kw = dict(base="rk2", n_steps=3, iters=3, finetune_iters=2, polish_iters=0, init="searched",
              batch_size=8, val=4, val_every=1, progress=False)
    plain, _ = bf.train(model, gt, **kw)
    ckpt, _ = bf.train(model, gt, activation_checkpointing=True, **kw)
    both, _ = bf.train(model, gt, activation_checkpointing=True, micro_batch=3, **kw)
    for a, b, c in zip(plain.parameters(), ckpt.parameters(), both.parameters()):
        assert torch.equal(a, b)            # recomputation is exact
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    moved = sum(float((p - q).detach().abs().max()) for p, q in zip(plain.parameters(),
                                                          BespokeSolver("rk2", 3).double().parameters()))
    assert moved > 1e-4                     # training did change the parameters


def test_checkpointing_recomputes_the_model_in_the_backward(gt64):
    model, gt = gt64
    calls = []

    def counted(x, t):
        calls.append(torch.is_grad_enabled())
        return model(x, t)

    batch = gt.subset(range(4))
    solver = _perturbed_solver()
    loss_backward(solver, model, batch, "bound", loss_model=model_for_loss(counted, True))
    assert len(calls) == 4                  # 2 stages forward + 2 recomputed in the backward


def test_autocast_runs_the_model_in_bf16_and_keeps_the_solver_maths_in_the_gt_dtype(gt64):
    model, gt = gt64
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(64, 64, dtype=torch.float32)

        def forward(self, x, t):
            h = self.lin(x)
            seen.append((x.dtype, h.dtype))
            return h + model(x.double(), t.double()).to(h.dtype)

    net = Probe()
    solver = _perturbed_solver()
    batch = gt.subset(range(6))
    loss_model = model_for_loss(net, autocast=torch.bfloat16)
    loss, _ = loss_backward(solver, net, batch, "bound", loss_model=loss_model)
    assert {s for s in seen} == {(torch.float32, torch.bfloat16)}
    assert loss.dtype == torch.float64
    assert all(p.grad.dtype == torch.float64 and torch.isfinite(p.grad).all()
               for p in solver.parameters())
    with pytest.raises(ValueError, match="autocast must be"):
        model_for_loss(net, autocast=torch.float64)
