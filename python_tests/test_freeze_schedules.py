"""Freezing schedules: semantics (epochs from 0, True = frozen), validation, state, resume."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
import torch
from torch import nn

from dbf_ext.freeze import (
    AlwaysFrozen,
    EvenInterval,
    FreezeRun,
    FromCallable,
    FrozenAfter,
    FrozenUntil,
    NeverFrozen,
    StepInterval,
    apply_dbf,
    schedule_from_dbf_options,
)


def trained_epochs(schedule, num_epochs):
    return [epoch for epoch in range(num_epochs) if not schedule.is_frozen(epoch)]


def test_reference_example_trains_in_5_of_100_epochs():
    # The reference README: --dbf-options "{'steps': [i for i in range(1, 100, 20)]}".
    schedule = StepInterval(range(1, 100, 20))
    assert trained_epochs(schedule, 100) == [1, 21, 41, 61, 81]
    timeline = schedule.describe(100)
    assert (timeline.num_trained, timeline.num_frozen) == (5, 95)


def test_step_interval_ignores_order_and_duplicates():
    schedule = StepInterval([7, 2, 2, 0])
    assert schedule.unfrozen_epochs == (0, 2, 7)
    assert trained_epochs(schedule, 10) == [0, 2, 7]
    assert StepInterval([]).describe(4).frozen == (True,) * 4


def test_even_interval_trains_on_multiples():
    assert trained_epochs(EvenInterval(20), 100) == [0, 20, 40, 60, 80]
    assert trained_epochs(EvenInterval(1), 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "schedule, expected_frozen",
    [
        (AlwaysFrozen(), [True] * 6),
        (NeverFrozen(), [False] * 6),
        (FrozenAfter(2), [False, False, True, True, True, True]),
        (FrozenAfter(0), [True] * 6),
        (FrozenUntil(2), [True, True, False, False, False, False]),
        (FrozenUntil(0), [False] * 6),
        (FromCallable(lambda epoch: epoch % 3 == 1), [False, True, False, False, True, False]),
        (FromCallable(lambda epoch: np.bool_(epoch >= 4)), [False] * 4 + [True] * 2),
    ],
    ids=repr,
)
def test_schedule_decisions(schedule, expected_frozen):
    assert [schedule.is_frozen(epoch) for epoch in range(6)] == expected_frozen
    assert list(schedule.describe(6).frozen) == expected_frozen
    assert all(type(schedule.is_frozen(epoch)) is bool for epoch in range(6))


def test_epochs_accept_integer_likes():
    schedule = StepInterval(np.arange(0, 10, 5))
    assert schedule.unfrozen_epochs == (0, 5)
    assert not schedule.is_frozen(np.int64(5))
    assert not schedule.is_frozen(torch.tensor(5))


@pytest.mark.parametrize(
    "make, error",
    [
        (lambda: StepInterval([1]).is_frozen(-1), ValueError),
        (lambda: StepInterval([1]).is_frozen(1.0), TypeError),
        (lambda: StepInterval([1]).is_frozen(True), TypeError),
        (lambda: StepInterval([1]).is_frozen("1"), TypeError),
        (lambda: StepInterval("1,21"), TypeError),
        (lambda: StepInterval(5), TypeError),
        (lambda: StepInterval({"steps": [1]}), TypeError),
        (lambda: StepInterval([1, 2.5]), TypeError),
        (lambda: StepInterval([1, -3]), ValueError),
        (lambda: EvenInterval(0), ValueError),
        (lambda: EvenInterval(2.0), TypeError),
        (lambda: FrozenAfter(-1), ValueError),
        (lambda: FrozenUntil(None), TypeError),
        (lambda: FromCallable(3), TypeError),
        (lambda: FromCallable(lambda epoch: epoch % 10).is_frozen(3), TypeError),
        (lambda: NeverFrozen().describe(-1), ValueError),
    ],
)
def test_invalid_input_is_rejected(make, error):
    with pytest.raises(error):
        make()


def test_describe_gives_timeline_compact_string_and_runs():
    timeline = StepInterval([1, 2, 5]).describe(7)
    assert timeline.frozen == (True, False, False, True, True, False, True)
    assert timeline.compact == "F T T F F T F"
    assert timeline.runs == (
        FreezeRun(0, 0, True),
        FreezeRun(1, 2, False),
        FreezeRun(3, 4, True),
        FreezeRun(5, 5, False),
        FreezeRun(6, 6, True),
    )
    assert str(timeline) == "epochs 0 frozen, 1-2 trained, 3-4 frozen, 5 trained, 6 frozen"
    assert NeverFrozen().describe(0).frozen == ()
    assert str(NeverFrozen().describe(0)) == "no epochs"


def test_reference_options_are_translated():
    assert trained_epochs(schedule_from_dbf_options("step_interval", {"steps": range(1, 100, 20)}), 100) == [
        1,
        21,
        41,
        61,
        81,
    ]
    assert trained_epochs(schedule_from_dbf_options("step_interval", {"steps": [3, 4]}), 10) == [3, 4]
    assert trained_epochs(schedule_from_dbf_options("step_even_interval", {"step_epoch": 4}), 10) == [0, 4, 8]


@pytest.mark.parametrize(
    "name, options, error, message",
    [
        ("step", {"steps": [1]}, ValueError, "unknown DBF schedule"),
        ("step_interval", {}, ValueError, "missing \\['steps'\\]"),
        ("step_interval", {"steps": [1], "step_epoch": 2}, ValueError, "unexpected \\['step_epoch'\\]"),
        ("step_even_interval", {"steps": [1]}, ValueError, "missing \\['step_epoch'\\]"),
        ("step_interval", "{'steps': [1]}", TypeError, "must be a mapping"),
        ("step_even_interval", {"step_epoch": 0}, ValueError, "step_epoch must be >= 1"),
    ],
)
def test_reference_options_errors(name, options, error, message):
    with pytest.raises(error, match=message):
        schedule_from_dbf_options(name, options)


@pytest.mark.parametrize(
    "saved, fresh",
    [
        (StepInterval(range(1, 100, 20)), StepInterval([])),
        (EvenInterval(7), EvenInterval(2)),
        (FrozenAfter(5), FrozenAfter(1)),
        (FrozenUntil(5), FrozenUntil(1)),
        (AlwaysFrozen(), AlwaysFrozen()),
    ],
    ids=lambda schedule: type(schedule).__name__,
)
def test_state_dict_round_trip_through_weights_only_load(saved, fresh):
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.describe(120).frozen == saved.describe(120).frozen
    assert fresh.state_dict() == saved.state_dict()


def test_load_state_dict_checks_type_and_keys():
    with pytest.raises(ValueError, match="schedule type 'EvenInterval'"):
        StepInterval([1]).load_state_dict(EvenInterval(3).state_dict())
    with pytest.raises(ValueError, match="needs keys"):
        EvenInterval(3).load_state_dict({"type": "EvenInterval"})
    with pytest.raises(TypeError):
        EvenInterval(3).load_state_dict([("type", "EvenInterval")])


def test_from_callable_keeps_its_function_on_load(caplog):
    def every_other_epoch(epoch):
        return epoch % 2 == 1

    schedule = FromCallable(every_other_epoch)
    assert schedule.state_dict() == {"type": "FromCallable", "fn_name": schedule.fn_name}
    with caplog.at_level(logging.WARNING, logger="dbf_ext.freeze.schedules"):
        schedule.load_state_dict({"type": "FromCallable", "fn_name": "something_else"})
    assert "something_else" in caplog.text
    assert schedule.describe(4).compact == "T F T F"


class _Detector(nn.Module):
    """A torchvision-like layout: ``backbone.body`` (trunk) and ``head``."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.head = nn.Conv2d(4, 2, 1)


def test_controller_resumes_mid_run_with_the_same_decisions(caplog):
    num_epochs, interrupted_after = 12, 6
    schedule = StepInterval([1, 2, 7])
    reference = apply_dbf(_Detector(), StepInterval([1, 2, 7]))
    uninterrupted = []
    for epoch in range(num_epochs):
        reference.on_epoch_start(epoch)
        uninterrupted.append(reference.is_frozen)

    first = apply_dbf(_Detector(), schedule)
    decisions = []
    for epoch in range(interrupted_after):
        first.on_epoch_start(epoch)
        decisions.append(first.is_frozen)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)

    # A new process: the schedule is configured differently, the checkpoint's parameters win.
    resumed = apply_dbf(_Detector(), StepInterval([0]))
    with caplog.at_level(logging.WARNING, logger="dbf_ext.freeze.controller"):
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert "replaces the configured" in caplog.text
    assert resumed.epoch == interrupted_after - 1
    assert resumed.is_frozen == decisions[-1]
    assert resumed.backbone.frozen == decisions[-1]
    for epoch in range(interrupted_after, num_epochs):
        resumed.on_epoch_start(epoch)
        decisions.append(resumed.is_frozen)
    assert decisions == uninterrupted == [schedule.is_frozen(epoch) for epoch in range(num_epochs)]


def test_controller_reports_and_logs_transitions(caplog):
    controller = apply_dbf(_Detector(), StepInterval([1]))
    with caplog.at_level(logging.INFO, logger="dbf_ext.freeze.controller"):
        changes = [controller.on_epoch_start(epoch) for epoch in range(4)]
    assert changes == [True, True, True, False]
    transitions = [record.getMessage() for record in caplog.records if record.levelno == logging.INFO]
    assert transitions == [
        "DBF epoch 0: backbone frozen (was trained)",
        "DBF epoch 1: backbone trained (was frozen)",
        "DBF epoch 2: backbone frozen (was trained)",
    ]


def test_controller_accepts_a_plain_callable_and_rejects_bad_state():
    controller = apply_dbf(_Detector(), lambda epoch: epoch >= 1)
    frozen = []
    for epoch in range(3):
        controller.on_epoch_start(epoch)
        frozen.append(controller.is_frozen)
    assert frozen == [False, True, True]
    with pytest.raises(ValueError, match="keys"):
        controller.load_state_dict({"epoch": 1})
    with pytest.raises(TypeError):
        apply_dbf(_Detector(), "step_interval")
