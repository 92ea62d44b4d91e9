import math

import pytest

from leanprop.config import ScheduleConfig
from leanprop.train.schedules import LRSchedule


def test_multistep_by_epoch():
    s = LRSchedule(ScheduleConfig(name="multistep", milestones=[50, 100], gamma=0.1), 0.1, 391, 150)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(50 * 391 - 1) == pytest.approx(0.1)
    assert s.lr_at(50 * 391) == pytest.approx(0.01)
    assert s.lr_at(100 * 391) == pytest.approx(0.001)


def test_warmup_then_multistep_swat_imagenet():
    # SWAT spec §2.2: lr*(it+1)/(T+1) for it < T = 5 epochs, then x0.1 at 30/60/80
    spe = 5005
    s = LRSchedule(ScheduleConfig(name="multistep", milestones=[30, 60, 80], warmup_epochs=5), 0.1, spe, 90)
    T = 5 * spe
    assert s.lr_at(0) == pytest.approx(0.1 / (T + 1))
    assert s.lr_at(T - 1) == pytest.approx(0.1 * T / (T + 1))
    assert s.lr_at(T) == pytest.approx(0.1)
    assert s.lr_at(30 * spe) == pytest.approx(0.01)
    assert s.lr_at(80 * spe) == pytest.approx(1e-4)


def test_piecewise_blpa():
    cfg = ScheduleConfig(name="piecewise", boundaries=[400, 32000, 48000], values=[0.01, 0.1, 0.01, 0.001])
    s = LRSchedule(cfg, 0.1, 391, 164)
    assert [s.lr_at(i) for i in (0, 399, 400, 31999, 32000, 48000, 63999)] == [
        0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001]


def test_cosine_endpoints():
    s = LRSchedule(ScheduleConfig(name="cosine", min_lr=0.0), 0.2, 10, 4)
    assert s.lr_at(0) == pytest.approx(0.2)
    assert s.lr_at(20) == pytest.approx(0.1)
    assert s.lr_at(40) == pytest.approx(0.0, abs=1e-12)
    assert all(s.lr_at(i) >= s.lr_at(i + 1) for i in range(40))
    assert not math.isnan(s.lr_at(1000))
