"""Device and dtype choice: ``cuda`` when there is one, then ``mps``, else the CPU."""

from __future__ import annotations

import torch

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def pick_device(device: str | torch.device = "auto") -> torch.device:
    """Resolve ``"auto"`` to the best device here; check any other name is usable."""
    if isinstance(device, torch.device):
        return device
    if not isinstance(device, str):
        raise TypeError(f"device must be a string like 'auto', 'cpu' or 'cuda', not {type(device).__name__}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA GPU; use 'auto' or 'cpu'")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device {device!r} asked for, but MPS is not available here; use 'auto' or 'cpu'")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {device!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    return dev


_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means float32: exact token equality with ``transformers`` needs fp32.

    Only floating-point dtypes a model's weights can be loaded in are accepted: float32, bfloat16,
    float16 (and float64); ``torch.int8`` and the like are refused by name (quantisation is another tool).
    """
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _WEIGHT_DTYPES:
            raise ValueError(
                f"dtype {dtype} cannot hold model weights here: expected a floating-point dtype, torch.float32, "
                f"torch.bfloat16 or torch.float16 (or None for float32); int8/fp8 quantisation is not supported"
            )
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"unknown dtype {dtype!r}: expected one of {sorted(_DTYPES)} or a torch.dtype")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch (a no-op on the CPU)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}: expected a torch.device or 'cpu', 'cuda', 'cuda:N' or "
                         f"'mps'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"cannot synchronize {device!r}: this machine has no CUDA GPU (a model on the CPU needs "
                         f"no synchronizing: pass 'cpu' or the model's device)")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    elif dev.type == "mps":
        torch.mps.synchronize()
