"""Linear layers on prepacked oneDNN weights, for decoding on a CPU.

A decode step multiplies a few rows (one token, a tree's 5-30 nodes, a batch's rows) by every weight matrix. The
stock CPU kernel of `torch.nn.functional.linear` (MKL sgemm) handles such short inputs badly on some processors:
on this project's AMD EPYC a [M, 576] x [576, 1536] product measured 73 us for M = 1, 137 us for 2, 202 us for 3
and 177 us for 4, so verifying a 4-node tree cost about 2.5 single-token steps. oneDNN on a weight reordered once
for it (`torch.ops.mkldnn._reorder_linear_weight`, the kernel PyTorch's own CPU inductor emits) took 44, 45, 50
and 57 us. The arithmetic is the same product; only the summation order inside the kernel differs (logits within
1e-4 of stock on SmolLM2-135M), as it does between the stock kernel's own paths for different M.

- `PackedWeight`: a weight's packed copy, made on first use and remade whenever the weight changes in place
  (its `_version`), so a trained head never reads stale weights.
- `PackedLinear`: an `nn.Linear` (same parameters, same `isinstance`) whose forward uses the packed weight when it
  can: a CPU tensor of the weight's dtype (float32, or bfloat16 where oneDNN supports it), no gradient needed.
  Otherwise, the stock `F.linear`.
- `pack_linears(module)`: turns every `nn.Linear` under a module into a `PackedLinear` in place (unless
  EAGLERAY_PACKED_LINEARS=0, or the packed copies would not fit comfortably in free memory: they double the
  linear weights' memory). `stock_linears(module)`: a block in which they run the stock kernel again, for
  baselines.

It changes no model code and no weight; it does not apply on GPUs (their kernels handle short inputs well).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)
ENV = "EAGLERAY_PACKED_LINEARS"  # "0" turns packing off
BATCH_HINT = 8  # rows oneDNN tunes the packed layout for; any number of rows works
MEMORY_SHARE = 0.5  # pack only when the copies take at most this share of the memory now free


@functools.cache  # read on every call of every layer: ask oneDNN once
def _supported_dtypes() -> tuple[torch.dtype, ...]:
    if not torch.backends.mkldnn.is_available():
        return ()
    return (
        (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
    )


class PackedWeight:
    """A [out, in] weight's oneDNN-packed copy, kept in step with the weight."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.packed: torch.Tensor | None = None
        self.version: tuple[int, int] | None = None

    def usable(self, x: torch.Tensor) -> bool:
        weight = self.weight
        return (
            x.device.type == "cpu"
            and weight.device.type == "cpu"
            and x.dtype == weight.dtype
            and weight.dtype in _supported_dtypes()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and os.environ.get(ENV, "1") != "0"  # also off for weights used outside a PackedLinear
        )

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [..., in] -> [..., out], as F.linear(x, weight, bias)."""
        if not self.usable(x):
            return F.linear(x, self.weight, bias)
        # Inference tensors keep no version counter; their storage identifies them.
        version = (self.weight.data_ptr(), -1 if self.weight.is_inference() else self.weight._version)
        if self.packed is None or version != self.version:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), BATCH_HINT)
            self.version = version
        flat = x.reshape(-1, x.shape[-1])  # [N, in]
        out = torch.ops.mkldnn._linear_pointwise(flat, self.packed, bias, "none", [], "")
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def __getstate__(self) -> dict:  # the packed copy is an opaque tensor: copies and pickles repack
        return {**self.__dict__, "packed": None, "version": None}


class PackedLinear(nn.Linear):
    """An nn.Linear computing on a packed copy of its weight where it can (see the module docstring)."""

    packing: PackedWeight
    use_packed: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_packed:
            return F.linear(x, self.weight, self.bias)
        if self.packing.weight is not self.weight:  # the parameter was replaced (e.g. weights tied anew)
            self.packing = PackedWeight(self.weight)
        return self.packing.linear(x, self.bias)


def _linears(module: nn.Module) -> Iterator[nn.Linear]:
    seen: set[int] = set()
    for child in module.modules():
        if isinstance(child, nn.Linear) and id(child) not in seen:
            seen.add(id(child))
            yield child


def _free_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def pack_linears(module: nn.Module) -> int:
    """Make every nn.Linear under `module` a PackedLinear, in place; the number packed (0 when packing is off,
    unsupported for the module's device and dtype, or too large for the free memory)."""
    if os.environ.get(ENV, "1") == "0":
        return 0
    linears = [
        linear
        for linear in _linears(module)
        if linear.weight.device.type == "cpu" and linear.weight.dtype in _supported_dtypes()
    ]
    new = [linear for linear in linears if not isinstance(linear, PackedLinear)]
    needed = sum(linear.weight.numel() * linear.weight.element_size() for linear in new)
    free = _free_memory_bytes()
    if new and free is not None and needed > MEMORY_SHARE * free:
        logger.warning(
            "not packing %d linear layers for oneDNN: their copies (%.0f MB) would take over half the free "
            "memory (%.0f MB); decoding uses the stock kernels",
            len(new),
            needed / 2**20,
            free / 2**20,
        )
        return 0
    for linear in new:
        linear.__class__ = PackedLinear
        linear.packing = PackedWeight(linear.weight)
    for linear in linears:
        linear.use_packed = True
    return len(linears)


@contextlib.contextmanager
def stock_linears(module: nn.Module) -> Iterator[None]:
    """Inside the block, `module`'s PackedLinear layers use the stock kernel (the baseline a bench measures)."""
    packed = [linear for linear in _linears(module) if isinstance(linear, PackedLinear) and linear.use_packed]
    for linear in packed:
        linear.use_packed = False
    try:
        yield
    finally:
        for linear in packed:
            linear.use_packed = True
