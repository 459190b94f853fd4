"""NT-Xent against a loop reference and a closed form, and the cross-process gather against the
single-process loss on the global batch (real gloo process group, 2 ranks)."""

from __future__ import annotations

import math
import os
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from drray.losses import binary_cross_entropy, nt_xent

TEMPERATURE = 0.5


def reference_nt_xent(z1: np.ndarray, z2: np.ndarray, t: float) -> float:
    """The SimCLR definition written out anchor by anchor, in float64."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n2, n = len(z), len(z1)
    total = 0.0
    for i in range(n2):
        pos = (i + n) % n2
        denom = sum(math.exp(z[i] @ z[k] / t) for k in range(n2) if k != i)
        total += -math.log(math.exp(z[i] @ z[pos] / t) / denom)
    return total / n2


def test_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    for n, d in [(1, 3), (5, 8), (16, 4)]:
        z1, z2 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
        expected = reference_nt_xent(z1.numpy(), z2.numpy(), TEMPERATURE)
        assert nt_xent(z1, z2, TEMPERATURE).item() == pytest.approx(expected, abs=1e-5)


def test_closed_form_orthogonal_views():
    # Both views identical, N orthonormal vectors: the positive has cosine 1, the other 2N - 2
    # candidates cosine 0, so loss = log(1 + (2N - 2) exp(-1/t)) for every anchor.
    n, t = 4, 0.1
    z = torch.eye(n, 6)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, abs=1e-6)


def test_more_similar_positives_lower_loss_and_scale_invariance():
    g = torch.Generator().manual_seed(1)
    z1, noise = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    far, near = nt_xent(z1, noise, TEMPERATURE), nt_xent(z1, z1 + 0.1 * noise, TEMPERATURE)
    assert near < far
    scaled = nt_xent(7.0 * z1, 0.01 * noise, TEMPERATURE)
    assert scaled.item() == pytest.approx(far.item(), abs=1e-6)


def test_bf16_inputs_give_float32_loss():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    low = nt_xent(z1.bfloat16(), z2.bfloat16(), TEMPERATURE)
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(nt_xent(z1, z2, TEMPERATURE).item(), abs=2e-2)


def test_gather_without_process_group_is_local_loss():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    assert torch.equal(nt_xent(z1, z2, TEMPERATURE, gather=True), nt_xent(z1, z2, TEMPERATURE))


def test_mismatched_views_rejected():
    with pytest.raises(ValueError):
        nt_xent(torch.randn(4, 3), torch.randn(5, 3), TEMPERATURE)


def _global_batch() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        model, x1, x2 = _global_batch()
        half = slice(rank * 4, (rank + 1) * 4)
        loss = nt_xent(model(x1[half]), model(x2[half]), TEMPERATURE, gather=True)
        loss.backward()
        grads = {}
        for name, p in model.named_parameters():
            # What DDP does: sum over ranks, divide by world size.
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            grads[name] = p.grad / world
        with torch.no_grad():
            local = nt_xent(model(x1[half]), model(x2[half]), TEMPERATURE, gather=False)
        torch.save({"loss": loss.item(), "grads": grads, "local": local.item()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_and_ddp_gradients_equal_global_batch(tmp_path):
    model, x1, x2 = _global_batch()
    expected = nt_xent(model(x1), model(x2), TEMPERATURE)
    expected.backward()

    ctx, port = mp.get_context("spawn"), _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "a rank hung or failed"

    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert np.mean([r["loss"] for r in results]) == pytest.approx(expected.item(), abs=1e-6)
    for r in results:
        for name, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][name], p.grad, atol=1e-6, rtol=0)
    # Without the gather each rank sees fewer negatives: a broken gather would show up here.
    local_mean = np.mean([r["local"] for r in results])
    assert abs(local_mean - expected.item()) > 1e-2


def test_binary_cross_entropy_matches_torch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(10, generator=g)
    for targets in [torch.randint(0, 2, (10,), generator=g), torch.rand(10, generator=g)]:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
        got = binary_cross_entropy(logits.bfloat16(), targets)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(expected.item(), abs=1e-2)
        assert binary_cross_entropy(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)
