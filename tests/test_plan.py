"""The per-rank batch plan and the learning-rate schedule: plain NumPy, no MPI."""
import numpy as np
import pytest

from hvdtrain.config import TrainConfig
from hvdtrain.data import BatchPlan, eval_indices
from hvdtrain.errors import ConfigError
from hvdtrain.schedule import learning_rate


@pytest.mark.parametrize("n, batch, size", [(1437, 32, 2), (100, 7, 3), (64, 8, 8), (10, 10, 1)])
def test_ranks_are_disjoint_balanced_and_match_one_big_batch(n, batch, size):
    plans = [BatchPlan(n, batch, rank, size, seed=5) for rank in range(size)]
    single = BatchPlan(n, batch * size, 0, 1, seed=5)
    assert {p.steps_per_epoch for p in plans} == {n // (batch * size)} == {single.steps_per_epoch}
    for epoch in range(2):
        seen = []
        for step in range(single.steps_per_epoch):
            parts = [p.indices(epoch, step) for p in plans]
            assert all(len(part) == batch for part in parts)
            # 2 ranks x batch b see exactly 1 rank x batch 2b's samples, in order.
            assert np.array_equal(np.concatenate(parts), single.indices(epoch, step))
            seen.extend(np.concatenate(parts))
        assert len(seen) == len(set(seen)) == single.steps_per_epoch * batch * size
    assert not np.array_equal(single.epoch_order(0), single.epoch_order(1))


def test_batch_larger_than_data_is_a_config_error():
    with pytest.raises(ConfigError, match="train.batch_size"):
        BatchPlan(10, 8, 0, 2, seed=0)


def test_eval_shares_cover_the_test_set_once():
    shares = [eval_indices(11, r, 3) for r in range(3)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(11))


def test_lr_warms_up_to_the_scaled_rate_then_decays():
    cfg = TrainConfig(lr=0.1, warmup_steps=10, schedule="cosine")
    assert learning_rate(cfg, 0, 4, 110) == pytest.approx(0.1)
    assert learning_rate(cfg, 5, 4, 110) == pytest.approx(0.25)
    assert learning_rate(cfg, 10, 4, 110) == pytest.approx(0.4)
    assert learning_rate(cfg, 60, 4, 110) == pytest.approx(0.2)
    assert learning_rate(cfg, 110, 4, 110) == pytest.approx(0.0)
    flat = TrainConfig(lr=0.1, warmup_steps=0, schedule="constant", scale_lr=False)
    assert flat.scale_lr == "none" and learning_rate(flat, 50, 4, 110) == pytest.approx(0.1)


def test_scaling_rules_and_a_warm_up_that_spans_epochs():
    sqrt = TrainConfig(lr=0.1, scale_lr="sqrt", schedule="constant", warmup_epochs=0)
    assert learning_rate(sqrt, 0, 4, 100) == pytest.approx(0.2)
    assert TrainConfig(scale_lr=True).scale_lr == "linear"
    # 2 warm-up epochs of 10: 4 ranks take 5 steps an epoch (20 in all) and 1 rank 20 (80 in all)
    epochs = TrainConfig(lr=0.1, epochs=10, warmup_epochs=2, schedule="constant")
    assert learning_rate(epochs, 5, 4, 50) == pytest.approx(0.25)  # half-way up at step 5 of 10
    assert learning_rate(epochs, 10, 4, 50) == pytest.approx(0.4)
    assert learning_rate(epochs, 10, 1, 200) == pytest.approx(0.1)
