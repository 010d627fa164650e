"""Gradient compression: selection and error-feedback invariants, compressors, and real 2-rank runs.
The exchange's averages, state and resizes on an in-process group of ranks: tests/test_exchange.py."""
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from hvdtrain.exchange import ErrorFeedback
from hvdtrain.exchange.feedback import Accumulation, MomentumCorrection, accumulate
from hvdtrain.topk import TopK
from conftest import REPO, hvdtrain

finite = st.floats(-1e6, 1e6, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 3000), elements=finite), ratio=st.floats(0.001, 1.0))
def test_topk_selects_the_largest_magnitudes(x, ratio):
    k = max(1, int(len(x) * ratio))
    values, indices = TopK(seed=1)(x, k)
    assert len(np.unique(indices)) == len(indices) and np.array_equal(x[indices], values)
    nonzero = np.count_nonzero(x)
    assert len(values) <= 1.1 * k + 1
    assert len(values) >= min(0.9 * k, nonzero) - 1
    unselected = np.delete(np.abs(x), indices)
    if len(values) and len(unselected):
        assert unselected.max() <= np.abs(values).min()


def test_topk_count_is_within_ten_percent_on_large_heavy_tailed_tensors():
    select = TopK(seed=3)
    rng = np.random.default_rng(0)
    for x in (rng.standard_normal(2_000_000).astype(np.float32), rng.standard_t(3, 2_000_000).astype(np.float32),
              rng.laplace(size=2_000_000).astype(np.float32)):
        values, _ = select(x, 20_000)
        assert 0.9 * 20_000 <= len(values) <= 1.1 * 20_000


@settings(max_examples=100, deadline=None)
@given(residual=arrays(np.float32, 500, elements=st.floats(-100, 100, width=32)),
       grad=arrays(np.float32, 500, elements=st.floats(-100, 100, width=32)), k=st.integers(1, 500))
def test_error_feedback_loses_nothing(residual, grad, k):
    incoming = residual + grad
    feedback = ErrorFeedback(len(residual))
    feedback.residual[:] = residual
    values, indices = TopK(seed=0)(feedback.add(slice(None), grad), k)
    feedback.sent(indices)
    sent = np.zeros_like(residual)
    sent[indices] = values
    assert np.array_equal(sent + feedback.residual, incoming)  # what is sent plus what stays = what came in
    assert np.all(feedback.residual[indices] == 0)


@settings(max_examples=60, deadline=None)
@given(grad=arrays(np.float32, 300, elements=finite), velocity=arrays(np.float32, 300, elements=finite),
       residual=arrays(np.float32, 300, elements=finite), momentum=st.sampled_from([0.0, 0.9, 0.99]))
def test_fused_accumulate_is_bit_identical_to_momentum_then_error_feedback(grad, velocity, residual, momentum):
    """The sparse methods' one compiled pass against the NumPy steps it replaces, with and without momentum."""
    part = slice(50, 250)
    expected_feedback, expected_momentum = ErrorFeedback(300), MomentumCorrection(momentum, 300, 300)
    feedback, fused_momentum = ErrorFeedback(300), MomentumCorrection(momentum, 300, 300)
    for f, m in ((expected_feedback, expected_momentum), (feedback, fused_momentum)):
        f.residual[:] = residual
        if momentum:
            m.velocity[:] = velocity
    expected = expected_feedback.add(part, expected_momentum.accelerate(grad.copy(), part)).copy()
    buffer = grad.copy()
    got = accumulate(feedback, fused_momentum, buffer, part)
    assert np.array_equal(got, expected, equal_nan=True) and feedback.pending
    assert np.array_equal(feedback.residual, expected_feedback.residual, equal_nan=True)
    assert np.array_equal(fused_momentum.velocity, expected_momentum.velocity, equal_nan=True)
    assert not buffer[part].any() and np.array_equal(buffer[:50], grad[:50]) and np.array_equal(buffer[250:], grad[250:])


@pytest.mark.parametrize("size", [3_000, 400_000, 1_500_000])  # whole-tensor sample; sampled; sampled, larger
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("values", ["normal", "ties", "sparse"])  # ties and sparse force the corrections
def test_selection_running_the_accumulation_equals_accumulating_first(size, momentum, values):
    """topk's single pass (accumulate while selecting) against the two passes: the same selection, residual,
    velocity and zeroed gradient, bit for bit."""
    rng = np.random.default_rng(size)
    grad, velocity, residual = (rng.standard_normal(size + 100).astype(np.float32) for _ in range(3))
    if values == "ties":  # a few distinct magnitudes: no threshold lands near k
        grad, residual = np.round(grad), np.round(residual)
        velocity[:] = 0
    elif values == "sparse":  # mostly zero: the first threshold finds too few
        grad[rng.random(grad.size) < 0.995] = 0
        residual[:], velocity[:] = 0, 0
    part = slice(60, 60 + size)
    results = []
    for fused in (False, True):
        feedback, velocities, buffer = ErrorFeedback(size + 100), MomentumCorrection(momentum, size + 100, size + 100), grad.copy()
        feedback.residual[:] = residual
        if momentum:
            velocities.velocity[:] = velocity
        if fused:
            got = TopK(seed=4)(feedback.residual[part], size // 100, 1, 2, 3,
                               accumulation=Accumulation(feedback, velocities, buffer, part))
        else:
            got = TopK(seed=4)(accumulate(feedback, velocities, buffer, part), size // 100, 1, 2, 3)
        results.append((*got, feedback.residual, velocities.velocity, buffer, feedback.pending))
    for expected, got in zip(*results):
        assert np.array_equal(expected, got)
    assert 0 < len(results[1][0]) <= 1.1 * (size // 100) + 1


def test_topk_sample_is_a_function_of_seed_and_key():
    """No generator runs on between calls: a resumed run samples (so selects) what the straight one does."""
    x = np.random.default_rng(0).standard_t(2, 1_000_000).astype(np.float32)  # large enough to be sampled
    first, again, other_step = TopK(seed=1)(x, 1000, 7, 42), TopK(seed=1)(x, 1000, 7, 42), TopK(seed=1)(x, 1000, 7, 43)
    assert np.array_equal(first[1], again[1]) and np.array_equal(first[0], again[0])
    select = TopK(seed=1)
    select(x, 1000, 7, 41)  # earlier calls change nothing
    assert np.array_equal(select(x, 1000, 7, 42)[1], first[1])
    assert 900 <= len(other_step[1]) <= 1100


@settings(max_examples=100, deadline=None)
@given(x=arrays(np.float32, st.integers(1, 200), elements=st.floats(-6e4, 6e4, width=32)))
def test_half_compressors_round_trip(x):
    from hvdtrain.torch.exchange import BF16Compressor, FP16Compressor

    for compressor, rtol in ((FP16Compressor, 1e-3), (BF16Compressor, 8e-3)):
        tensor = torch.from_numpy(x.copy())
        packed, ctx = compressor.compress(tensor)
        assert packed.dtype == compressor.dtype
        restored = compressor.decompress(packed, ctx)
        assert restored.dtype == torch.float32 and restored.data_ptr() == tensor.data_ptr()  # back in place
        assert torch.allclose(restored, torch.from_numpy(x), rtol=rtol, atol=1e-3)
        assert restored.equal(torch.from_numpy(x).to(compressor.dtype).float())  # exactly the cast's rounding
    ints = torch.arange(5)
    assert FP16Compressor.decompress(*FP16Compressor.compress(ints)).equal(ints)


def test_fp16_compressor_reuses_its_buffers_but_never_one_in_flight():
    """Horovod's overlapped exchange casts each gradient every step: the half buffers are kept per shape
    (fresh ones page-fault on CPU), and two gradients of one shape in flight together get two buffers."""
    from hvdtrain.torch.exchange import FP16Compressor

    shape = (3, 517)  # a shape no other test uses: the buffers are the class's
    first, second = torch.randn(shape), torch.randn(shape)
    packed_first, ctx_first = FP16Compressor.compress(first)
    packed_second, ctx_second = FP16Compressor.compress(second)
    assert packed_first.data_ptr() != packed_second.data_ptr()
    assert packed_first.equal(first.half()) and packed_second.equal(second.half())
    FP16Compressor.decompress(packed_first, ctx_first)
    FP16Compressor.decompress(packed_second, ctx_second)
    again, ctx = FP16Compressor.compress(torch.ones(shape))
    assert again.data_ptr() in (packed_first.data_ptr(), packed_second.data_ptr()) and again.equal(torch.ones(shape).half())
    FP16Compressor.decompress(again, ctx)
    other, ctx = FP16Compressor.compress(torch.ones(517, 3))  # another shape: its own buffer
    assert other.shape == (517, 3) and other.data_ptr() not in (packed_first.data_ptr(), packed_second.data_ptr())


CONFIG = str(REPO / "configs/digits-torch.yaml")
# SGD with momentum, as the compression methods were built for (momentum correction needs it)
SGD = ["train.optimizer=sgd", "train.lr=0.05", "train.scale_lr=linear", "train.momentum=0.9", "train.warmup_steps=50"]
SHORT = ["data.source=digits", "train.max_steps=40", "train.log_every=10", "compression.min_size=1000", *SGD]


# fp16, bf16 and powersgd: test_half_precision_and_powersgd_keep_ranks_identical_and_float32_accuracy
@pytest.mark.parametrize("method", ["topk", "shared_topk", "auto", "shared_topk+momentum"])
def test_every_mode_keeps_ranks_identical_and_counts_bytes(method, tmp_path):
    extra = {"auto": ["compression.auto_trial_steps=3", "compression.auto_recheck_every=20"],
             "shared_topk+momentum": ["compression.momentum_correction=true"]}.get(method, [])
    method = method.split("+")[0]
    hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path), *SHORT, f"compression.method={method}",
             *extra, np=2, controller="gloo")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["weights_identical"], summary["weights_digests"]
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["bytes_per_step"] > 0 and record["compression"].startswith(method)
    if method == "auto":
        assert record["compression"] in ("auto:none", "auto:topk") and {"none", "topk"} <= set(record["auto_seconds"])
        assert record["auto_tensors"].endswith("compressed")


@pytest.mark.parametrize("controller", ["gloo", "mpi"])
def test_fp16_on_cpu_matches_the_float32_average_where_horovods_fails(controller, tmp_path):
    """Horovod's fp16 compression averages in half precision, which fails on CPU tensors (its issue 2108).
    Under Gloo the half words are summed by gloo's F16C sum (scripts/patch_horovod.py), under MPI by Horovod's."""
    common = ["--config", CONFIG, *SHORT, "model.name=mlp"]
    hvdtrain("train", "--run-dir", str(tmp_path / "fp16"), *common, "compression.method=fp16", np=2,
             controller=controller)
    hvdtrain("train", "--run-dir", str(tmp_path / "none"), *common, np=2, controller=controller)
    summary = json.loads((tmp_path / "fp16/summary.json").read_text())
    assert summary["horovod_collectives"] == controller and summary["weights_identical"]
    half = torch.load(summary["checkpoint"], weights_only=True)
    full = torch.load(json.loads((tmp_path / "none/summary.json").read_text())["checkpoint"], weights_only=True)
    for name in full["model"]:
        assert torch.allclose(half["model"][name], full["model"][name], atol=5e-3), name


# Half precision against float32, per framework: torch fp16 through Horovod's DistributedOptimizer (overlap),
# torch bf16 and TensorFlow through their FlatExchange (bf16 words are allgathered: Horovod 0.28.1 allreduces
# no bfloat16). 10 epochs of the digits (220 steps) take seconds and reach about 98%; each framework's
# float32 run is shared by its half-precision runs.
HALF = {("torch", "fp16"): [CONFIG, "horovod.gradient_exchange=overlap"],
        ("torch", "bf16"): [CONFIG, "horovod.gradient_exchange=flat"],
        ("torch", "powersgd"): [CONFIG],
        ("torch", "none"): [CONFIG, "horovod.gradient_exchange=overlap"],
        ("tensorflow", "fp16"): [str(REPO / "configs/digits-tf.yaml")],
        ("tensorflow", "bf16"): [str(REPO / "configs/digits-tf.yaml")],
        ("tensorflow", "powersgd"): [str(REPO / "configs/digits-tf.yaml")],
        ("tensorflow", "none"): [str(REPO / "configs/digits-tf.yaml")]}


def train_half(framework: str, method: str, run_dir) -> dict:
    config, *extra = HALF[framework, method]
    hvdtrain("train", "--config", config, "--run-dir", str(run_dir), "data.source=digits", "train.epochs=10",
             "train.log_every=50", *extra, f"compression.method={method}", np=2)
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def fp32_accuracy(tmp_path_factory):
    accuracy = {}

    def of(framework: str) -> float:
        if framework not in accuracy:
            run_dir = tmp_path_factory.mktemp(f"fp32-{framework}")
            accuracy[framework] = train_half(framework, "none", run_dir)["final"]["test_accuracy"]
        return accuracy[framework]
    return of


@pytest.mark.parametrize("framework,method", [("torch", "fp16"), ("torch", "bf16"), ("torch", "powersgd"),
                                              ("tensorflow", "fp16"), ("tensorflow", "bf16"),
                                              ("tensorflow", "powersgd")])
def test_half_precision_and_powersgd_keep_ranks_identical_and_float32_accuracy(framework, method, fp32_accuracy,
                                                                                tmp_path):
    """PowerSGD (rank 4, warm start, 10 dense steps first) factorizes the CNN's two large matrices."""
    summary = train_half(framework, method, tmp_path)
    print(f"{framework} {method}: test_accuracy {summary['final']['test_accuracy']:.4f} "
          f"(float32 {fp32_accuracy(framework):.4f}), {summary['final']['bytes_per_step']:.0f} bytes/step")
    assert summary["weights_identical"], summary["weights_digests"]
    final = summary["final"]
    assert final["compression"] == method and final["bytes_per_step"] > 0
    assert final["test_accuracy"] >= fp32_accuracy(framework) - 0.01, (final, fp32_accuracy(framework))


@pytest.mark.parametrize("method", ["bf16", "topk"])
def test_overlap_refuses_what_it_cannot_send_in_one_line(method, tmp_path):
    proc = hvdtrain("check", "--config", CONFIG, "horovod.gradient_exchange=overlap", f"compression.method={method}",
                    check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "horovod.gradient_exchange: overlap cannot run" in lines[0], proc.stderr


def test_topk_with_error_feedback_matches_uncompressed_accuracy_on_digits(tmp_path):
    accuracy = {}
    for method in ("none", "topk"):
        hvdtrain("train", "--config", CONFIG, "--run-dir", str(tmp_path / method), "data.source=digits", *SGD,
                 f"compression.method={method}", np=2)
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        accuracy[method] = summary["final"]["test_accuracy"]
        assert summary["steps"] == 660
    # the convergence bar (0.97) and within 0.02 of dense: what 660 steps of top-k reach on a fresh install
    assert accuracy["topk"] >= max(0.97, accuracy["none"] - 0.02), accuracy


def test_auto_model_finds_the_link_and_compresses_only_where_it_pays():
    from hvdtrain.exchange import link_bandwidth, worth_compressing

    fixed, beta = 0.005, 1.25e8  # 5 ms per exchange, 1 Gbit/s
    dense, sparse = 17.4e6, 0.4e6
    assert link_bandwidth(fixed + dense / beta, dense, fixed + sparse / beta, sparse) == pytest.approx(beta)
    assert link_bandwidth(0.01, dense, 0.02, sparse) is None  # top-k's exchange was slower: no bandwidth to save
    counts, ks = [4_000_000, 5_000], [40_000, 50]
    # 1 Gbit/s: 4 M floats save ~32 ms against 3 ms of selection; 5 k floats save ~0.16 ms against 0.1 ms
    assert worth_compressing(counts, ks, [0.003, 0.0001], 2, beta) == [True, True]
    # 10 GB/s: the wire time saved (3 ms, 2 us) no longer pays for 4 ms and 0.1 ms of selection
    assert worth_compressing(counts, ks, [0.004, 0.0001], 2, 1e10) == [False, False]
    assert worth_compressing(counts, ks, [0.0, 0.0], 2, None) == [False, False]
