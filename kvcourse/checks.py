"""Checks for test cells that tell a learner what was expected, what came, and the likely cause.

Each ``expect_*`` raises ``AssertionError`` with a message written for the learner rather than a
bare ``assert``. nbgrader scores a test cell 0 when it raises, and shows the message. Every function
here sets ``__tracebackhide__`` (pytest honours it). IPython shows the frame that raised even when it
is marked, so importing this module in IPython installs a handler for ``AssertionError`` that drops the
marked frames and torch's decorator frames (``torch/utils/_contextlib.py``): a failing test cell's
traceback ends at the test cell's own line and the message, not inside this module. ``passed`` prints
the one line a test cell shows when all its checks hold.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch

_TORCH_DECORATOR = os.path.join("torch", "utils", "_contextlib.py")


def _internal(tb) -> bool:
    frame = tb.tb_frame
    return bool(frame.f_locals.get("__tracebackhide__")) or frame.f_code.co_filename.endswith(_TORCH_DECORATOR)


def _show_without_internal_frames(shell, etype, value, tb, tb_offset=None):
    """IPython custom exception handler: the usual traceback, minus the frames learners need not read."""
    kept = []
    while tb is not None:
        if not _internal(tb):
            kept.append(tb)
        tb = tb.tb_next
    for a, b in zip(kept, kept[1:], strict=False):
        a.tb_next = b
    if kept:
        kept[-1].tb_next = None
    shell.showtraceback((etype, value, kept[0] if kept else None), tb_offset=tb_offset)


def _install_ipython_handler() -> None:
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is not None:
        shell.set_custom_exc((AssertionError,), _show_without_internal_frames)


_install_ipython_handler()


def _hint(hint: str) -> str:
    return f"\nLikely cause: {hint}" if hint else ""


def expect_tensor(x, name: str, hint: str = "") -> None:
    __tracebackhide__ = True
    if not isinstance(x, torch.Tensor):
        raise AssertionError(f"{name}: expected a torch.Tensor, got {type(x).__name__}.{_hint(hint)}")


def expect_shape(x, shape: Sequence[int], name: str, hint: str = "") -> None:
    """x must be a tensor of exactly this shape."""
    __tracebackhide__ = True
    expect_tensor(x, name, hint)
    if tuple(x.shape) != tuple(shape):
        raise AssertionError(f"{name}: expected shape {tuple(shape)}, got {tuple(x.shape)}.{_hint(hint)}")


def expect_dtype(x, dtype: torch.dtype, name: str, hint: str = "") -> None:
    __tracebackhide__ = True
    expect_tensor(x, name, hint)
    if x.dtype != dtype:
        raise AssertionError(f"{name}: expected dtype {dtype}, got {x.dtype}.{_hint(hint)}")


def expect_close(actual, expected: torch.Tensor, name: str, *, atol: float = 1e-5, rtol: float = 1e-5,
                 hint: str = "") -> None:
    """Same shape, and every element within atol + rtol * |expected|."""
    __tracebackhide__ = True
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
    __tracebackhide__ = True
    expect_shape(actual, expected.shape, name, hint)
    if actual.is_floating_point() or actual.is_complex() or actual.dtype == torch.bool:
        raise AssertionError(f"{name}: token ids must be integers (torch.long, as argmax gives them), got "
                             f"{actual.dtype}.{_hint(hint)}")
    if not torch.equal(actual.cpu(), expected.cpu()):
        diff = (actual.cpu() != expected.cpu()).nonzero()[0].tolist()
        raise AssertionError(
            f"{name}: tokens differ from the reference, first at (batch, position) {tuple(diff)}: "
            f"expected {int(expected[tuple(diff)])}, got {int(actual[tuple(diff)])}.{_hint(hint)}"
        )


def expect_raises(fn: Callable[[], object], errors: type[BaseException] | tuple[type[BaseException], ...],
                  name: str, hint: str = "") -> BaseException:
    """fn() must raise one of ``errors`` (a clear error, not a silent wrong answer)."""
    __tracebackhide__ = True
    try:
        fn()
    except errors as err:
        return err
    except Exception as err:  # noqa: BLE001 - report what came instead
        raise AssertionError(f"{name}: expected {errors}, but got {type(err).__name__}: {err}.{_hint(hint)}") from err
    raise AssertionError(f"{name}: expected an error ({errors}), but nothing was raised.{_hint(hint)}")


def expect(condition: bool, message: str, hint: str = "") -> None:
    """A plain condition with a learner-readable message."""
    __tracebackhide__ = True
    if not condition:
        raise AssertionError(f"{message}{_hint(hint)}")


def passed(what: str) -> None:
    """The last line of a test cell: one line that says what was checked and that it holds."""
    print(f"\u2713 {what}")


@contextmanager
def reference_for(namespace: dict, **references: object) -> Iterator[None]:
    """Inside the block, earlier answers named in ``references`` are the reference implementations.

    A later exercise calls the learner's earlier answers by their global names; a test cell that wraps its
    calls in ``with reference_for(globals(), attention_weights=ref_attention_weights): ...`` grades the later
    exercise alone, so one mistake costs points once, in the cell that tests it. The names are restored after.
    """
    missing = object()
    saved = {name: namespace.get(name, missing) for name in references}
    namespace.update(references)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is missing:
                namespace.pop(name, None)
            else:
                namespace[name] = value
