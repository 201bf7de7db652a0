"""GuardedStep on a hand-checkable problem: clipping, skipped non-finite steps, fp16 loss scaling."""

from __future__ import annotations

import math

import pytest
import torch

from learner.precision import GuardedStep, training_dtype


def _problem(mixed_precision: str = "no", lr: float = 0.5):
    param = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = torch.optim.SGD([param], lr=lr)
    return param, GuardedStep([param], optimizer, mixed_precision=mixed_precision, device_type="cpu",
                              max_grad_norm=1.0)


def test_a_finite_step_is_clipped_and_applied():
    param, step = _problem()
    step.backward((param**2).sum() / 2)  # gradient = param = (3, 4), norm 5 -> clipped to norm 1
    result = step.step()
    assert not result.skipped and result.grad_norm == pytest.approx(5.0)
    torch.testing.assert_close(param.detach(), torch.tensor([3.0 - 0.5 * 0.6, 4.0 - 0.5 * 0.8]))
    assert (step.steps_taken, step.skipped_total, step.skipped_in_row) == (1, 0, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_nonfinite_loss_or_gradient_is_skipped_and_counted(bad):
    param, step = _problem()
    for k in range(3):
        step.backward((param * bad).sum())
        result = step.step(loss_finite=False)
        assert result.skipped and not math.isfinite(result.grad_norm)
        assert step.skipped_in_row == k + 1
    torch.testing.assert_close(param.detach(), torch.tensor([3.0, 4.0]))  # untouched
    assert param.grad is None and not step.optimizer.state
    step.backward((param**2).sum() / 2)
    assert not step.step().skipped and step.skipped_in_row == 0 and step.skipped_total == 3


def test_a_finite_gradient_with_a_nonfinite_loss_is_still_skipped():
    param, step = _problem()
    step.backward((param**2).sum())
    assert step.step(loss_finite=False).skipped
    torch.testing.assert_close(param.detach(), torch.tensor([3.0, 4.0]))


def test_fp16_scaler_scales_unscales_and_halves_after_an_overflow():
    param, step = _problem("fp16")
    assert step.loss_scale == 2.0**16
    step.backward((param * 1e-8).sum())  # tiny gradient: scaled for backward, unscaled for the step
    torch.testing.assert_close(step.unscaled_gradient(), torch.tensor([1e-8, 1e-8]))
    assert not step.step().skipped
    step.backward((param * 1e35).sum())  # 1e35 * 65536 overflows float32: skipped, scale halved
    assert step.step().skipped and step.loss_scale == 2.0**15
    state = step.state_dict()
    _, restored = _problem("fp16")
    restored.load_state_dict(state)
    assert restored.loss_scale == 2.0**15 and restored.skipped_total == 1 and restored.steps_taken == 1


def test_training_dtype_names_the_valid_modes():
    assert [training_dtype(m) for m in ("no", "bf16", "fp16")] == ["float32", "bfloat16", "float16"]
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp8' is not one of \['no', 'bf16', 'fp16'\]"):
        training_dtype("fp8")
