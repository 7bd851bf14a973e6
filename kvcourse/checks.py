"""Checks for test cells that tell a learner what was expected, what came, and the likely cause.

Each ``expect_*`` raises ``AssertionError`` with a message written for the learner rather than a
bare ``assert``. nbgrader scores a test cell 0 when it raises, and shows the message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def _hint(hint: str) -> str:
    return f"\nLikely cause: {hint}" if hint else ""


def expect_tensor(x, name: str, hint: str = "") -> None:
    if not isinstance(x, torch.Tensor):
        raise AssertionError(f"{name}: expected a torch.Tensor, got {type(x).__name__}.{_hint(hint)}")


def expect_shape(x, shape: Sequence[int], name: str, hint: str = "") -> None:
    """x must be a tensor of exactly this shape."""
    expect_tensor(x, name, hint)
    if tuple(x.shape) != tuple(shape):
        raise AssertionError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}.{_hint(hint)}")


def expect_dtype(x, dtype: torch.dtype, name: str, hint: str = "") -> None:
    expect_tensor(x, name, hint)
    if x.dtype != dtype:
        raise AssertionError(f"{name}: expected dtype {dtype}, got {x.dtype}.{_hint(hint)}")


def expect_close(actual, expected: torch.Tensor, name: str, *, atol: float = 1e-5, rtol: float = 1e-5,
                 hint: str = "") -> None:
    """Same shape, and every element within atol + rtol * |expected|."""
    expect_shape(actual, expected.shape, name, hint)
    a, e = actual.detach().float().cpu(), expected.detach().float().cpu()
    if torch.isnan(a).any() and not torch.isnan(e).any():
        raise AssertionError(f"{name}: contains NaN where the reference has none.{_hint(hint)}")
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        diff = (a - e).abs().max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {a.numel()} values differ from the reference "
            f"(largest difference {diff:.3g}, allowed {atol:g} + {rtol:g}*|expected|). "
            f"First at index {idx}: expected {e[idx].item():.6g}, got {a[idx].item():.6g}.{_hint(hint)}"
        )


def expect_equal_tokens(actual, expected: torch.Tensor, name: str, hint: str = "") -> None:
    """Token ids must match exactly; the message names the first position that differs."""
    expect_shape(actual, expected.shape, name, hint)
    if not torch.equal(actual.cpu(), expected.cpu()):
        diff = (actual.cpu() != expected.cpu()).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: tokens differ from the reference, first at (batch, position) {tuple(diff)}: "
            f"expected {int(expected[tuple(diff)])}, got {int(actual[tuple(diff)])}.{_hint(hint)}"
        )


def expect_raises(fn: Callable[[], object], errors: type[BaseException] | tuple[type[BaseException], ...],
                  name: str, hint: str = "") -> BaseException:
    """fn() must raise one of ``errors`` (a clear error, not a silent wrong answer)."""
    try:
        fn()
    except errors as err:
        return err
    except Exception as err:  # noqa: BLE001 - report what came instead
        raise AssertionError(f"{name}: expected {errors}, but got {type(err).__name__}: {err}.{_hint(hint)}") from err
    raise AssertionError(f"{name}: expected an error ({errors}), but nothing was raised.{_hint(hint)}")


def expect(condition: bool, message: str, hint: str = "") -> None:
    """A plain condition with a learner-readable message."""
    if not condition:
        raise AssertionError(f"{message}{_hint(hint)}")
