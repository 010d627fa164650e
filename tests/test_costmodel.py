"""The alpha-beta model: fitting recovers the link, and the exchanges scale as they should."""
import pytest

from hvdtrain.costmodel import Link, efficiency, project


def test_fit_recovers_alpha_and_beta():
    truth = Link(alpha=50e-6, beta=1.2e9)
    sizes = [2**k for k in range(12, 27)]
    for ranks in (2, 4, 8):
        fitted = Link.fit_ring(sizes, [truth.ring_allreduce(m, ranks) for m in sizes], ranks)
        assert fitted.alpha == pytest.approx(truth.alpha, rel=1e-6)
        assert fitted.beta == pytest.approx(truth.beta, rel=1e-6)


def test_topk_traffic_grows_with_ranks_shared_topk_does_not():
    link = Link(alpha=0.0, beta=1e9)
    k = 250_000
    assert link.topk_allgather(k, 64) == pytest.approx(63 / 1 * link.topk_allgather(k, 2))
    # bandwidth term of shared top-k is bounded by ~2 x k values + k indices whatever the size
    assert link.shared_topk(k, 512) < 3 * k * 4 / 1e9 * 1.01
    assert link.shared_topk(k, 512) < link.topk_allgather(k, 512) / 100


def test_projection_orders_the_methods_on_a_slow_link():
    link = Link(alpha=30e-6, beta=125e6)  # about 1 Gbit/s
    curves = project(link, gradient_bytes=100e6, compute_seconds=0.2, ranks=[2, 8, 64, 512])
    assert curves["shared_topk"][-1] > curves["dense"][-1] > curves["topk"][-1]
    assert curves["fp16"][0] > curves["dense"][0]
    assert all(0 < e <= 1 for values in curves.values() for e in values)
    assert efficiency(1.0, 0.0) == 1.0
