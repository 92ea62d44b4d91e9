"""The one timing loop (leanprop.timing), with an injected clock: no test depends on a measured time."""

import pytest
import torch
from torch import nn

from leanprop.timing import device_sync, interleaved, time_calls, time_step, training_step


class FakeClock:
    """A clock that advances only when a timed function says so (``advance``) and records every reading."""

    def __init__(self):
        self.now = 0.0
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_time_calls_times_each_rep_after_untimed_warmup():
    clock, calls = FakeClock(), []
    costs = iter([100.0, 1.0, 2.0, 3.0])  # the warm-up call's cost must not show

    def fn():
        calls.append(1)
        clock.advance(next(costs))

    assert time_calls(fn, reps=3, warmup=1, timer=clock) == [1.0, 2.0, 3.0]
    assert len(calls) == 4 and clock.readings == 6  # two readings per timed call, none for the warm-up


def test_time_calls_syncs_before_starting_and_before_stopping_the_clock():
    clock, events = FakeClock(), []

    def fn():
        events.append("call")
        clock.advance(1.0)

    def sync():
        events.append("sync")
        clock.advance(0.5)  # queued work finishing: counted in the call that queued it

    assert time_calls(fn, reps=2, timer=clock, sync=sync) == [1.5, 1.5]
    assert events == ["sync", "call", "sync", "call", "sync"]
    assert time_calls(fn, reps=0, timer=clock) == []
    with pytest.raises(ValueError, match="reps"):
        time_calls(fn, reps=-1)


def test_interleaved_runs_round_by_round_and_drops_warmup_rounds():
    clock, order, notes = FakeClock(), [], []
    cost = {"a": 1.0, "b": 10.0}

    def make(name):
        def fn():
            order.append(name)
            clock.advance(cost[name])
            cost[name] += 1  # each call of a function costs one second more than the last
        return fn

    times = interleaved({"a": make("a"), "b": make("b")}, rounds=2, warmup=1, timer=clock, progress=notes.append)
    assert order == ["a", "b"] * 3  # every function once per round, in order
    assert times == {"a": [2.0, 3.0], "b": [11.0, 12.0]}  # the warm-up round (1.0, 10.0) left out
    assert notes[:2] == ["step 1/3 a", "step 1/3 b"] and notes[-1] == "step 3/3 b"
    assert interleaved({"a": make("a")}, rounds=0, timer=clock) == {"a": []}


class _Counter:
    """A controller that counts its step() calls (the protocol's call after optimizer.step())."""

    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1


def test_training_step_is_forward_loss_backward_update_then_controller():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = _Counter()
    before = [p.detach().clone() for p in model.parameters()]
    ref = nn.functional.cross_entropy(model(x), y)
    loss = training_step(model, ctl, opt, x, y)()
    assert loss.item() == pytest.approx(ref.item())
    assert ctl.steps == 1 and all(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    entered = []

    class Ctx:
        def __enter__(self):
            entered.append(True)

        def __exit__(self, *exc):
            return False

    training_step(model, None, opt, x, y, autocast=Ctx)()  # no controller: plain PyTorch training
    assert entered == [True]


def test_time_step_times_one_training_step_with_the_injected_clock():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 0])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctl = _Counter()
    clock = iter([5.0, 7.25])
    assert time_step(model, ctl, opt, x, y, timer=lambda: next(clock)) == 2.25
    assert ctl.steps == 1
    assert device_sync("cpu") is None and device_sync(torch.device("cuda", 0)) is torch.cuda.synchronize
