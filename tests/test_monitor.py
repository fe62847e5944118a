"""Stage 2's timestep monitor: Spearman's rho, the saturation test and its warnings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.monitor import SATURATED_P, TimestepMonitor, ranks, saturated, spearman


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, 40).astype(float)  # many ties
    y = x * 2 + rng.normal(0, 2, 40)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert list(ranks(np.array([3.0, 1.0, 3.0]))) == [1.5, 0.0, 1.5]


def test_spearman_is_nan_for_constant_input():
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)


def test_saturation_needs_the_whole_batch():
    one_hot = torch.full((2, 10), -50.0)
    one_hot[:, 3] = 50.0
    assert saturated(one_hot)
    mixed = one_hot.clone()
    mixed[1] = 0.0  # flat for the second sample
    assert not saturated(mixed)


def test_monitor_scalars_and_rate_limited_warnings():
    warnings = []
    mon = TimestepMonitor(warnings.append)
    logits = torch.full((2, 10), -50.0)
    logits[:, 3] = 50.0
    for step in range(1, 151):
        qf = torch.tensor([10.0, 60.0])
        out = mon.update(step, logits, torch.tensor([3.0, 3.0]), torch.tensor([15.0, 55.0]), qf)
    assert out["p_max"] > SATURATED_P and out["qf_mae"] == pytest.approx(5.0)
    assert "tau_qf_spearman" not in out  # tau is constant: no correlation to report
    assert len(warnings) == 2 and "step 1:" in warnings[0] and "step 101:" in warnings[1]
    spread = TimestepMonitor(warnings.append)
    flat = torch.zeros(3, 10)
    flat[:, :3] = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    out = spread.update(1, flat, torch.zeros(3), None, torch.tensor([90.0, 50.0, 10.0]))
    assert out["tau_qf_spearman"] == pytest.approx(-1.0) and "qf_mae" not in out
    assert len(warnings) == 2
    assert TimestepMonitor(warnings.append).update(1, None, torch.ones(2), None,
                                                   torch.ones(2)) == {"tau": 1.0}
