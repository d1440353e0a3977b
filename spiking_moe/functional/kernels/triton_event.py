"""Triton kernel for :func:`~spiking_moe.functional.event.event_linear` on CUDA.

Two stages. PyTorch ops on the device list the active inputs of every row as a CSR structure:
``rowptr_R1`` (row ``r``'s entries are ``rowptr[r] .. rowptr[r + 1]``), ``cols_Z`` and
``values_Z`` in row-major order. Then one program per (row, block of ``BLOCK_O`` outputs) walks
its row's list ``BLOCK_Z`` entries at a time: it gathers those rows of ``weight_t`` (each a
contiguous, coalesced run of ``BLOCK_O`` values), scales them by the input values (1.0 for spikes:
exact, and free next to the loads) and adds them up, starting from the bias.

Listing the active inputs needs their count on the host (``nonzero``), one synchronisation per
call; it also gives the density that ``implementation="auto"`` compares with its threshold.
Block sizes are untuned (no GPU was available when this was written).

float32 and float64 only. With ``TRITON_INTERPRET=1`` set before import, the kernel also runs on
CPU tensors through Triton's interpreter (slow; used by the tests on machines without a GPU).
This module imports even where Triton is missing or broken; :data:`TRITON` then says why it
cannot run.

Shape letters: the package legend (:mod:`spiking_moe`).
"""

from __future__ import annotations

import torch

from .protocol import EventLinearArgs

# One Triton import and one availability rule for both Triton kernels: the LIF module's.
from .triton_lif import tl, triton, unavailable_reason

__all__ = ["TRITON"]

_BLOCK_O = 128
_BLOCK_Z = 16
_NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _event_linear_kernel(
        rowptr_ptr,
        cols_ptr,
        values_ptr,
        weight_t_ptr,
        bias_ptr,
        out_ptr,
        n_out,
        HAS_BIAS: tl.constexpr,
        BLOCK_O: tl.constexpr,
        BLOCK_Z: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask_o = offs_o < n_out
        start = tl.load(rowptr_ptr + row)
        end = tl.load(rowptr_ptr + row + 1)
        if HAS_BIAS:
            acc = tl.load(bias_ptr + offs_o, mask=mask_o, other=0.0)
        else:
            acc = tl.zeros([BLOCK_O], dtype=out_ptr.dtype.element_ty)
        for a0 in range(start, end, BLOCK_Z):
            offs_a = a0 + tl.arange(0, BLOCK_Z)
            mask_a = offs_a < end
            cols = tl.load(cols_ptr + offs_a, mask=mask_a, other=0).to(tl.int64)
            values = tl.load(values_ptr + offs_a, mask=mask_a, other=0.0)
            w = tl.load(
                weight_t_ptr + cols[:, None] * n_out + offs_o[None, :],
                mask=mask_a[:, None] & mask_o[None, :],
                other=0.0,
            )
            acc += tl.sum(values[:, None] * w, axis=0)
        tl.store(out_ptr + row * n_out + offs_o, acc, mask=mask_o)


class _TritonProvider:
    """The Triton kernel: CUDA tensors (CPU ones under the interpreter), float32/float64."""

    name = "triton"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return unavailable_reason(x)

    def forward(self, args: EventLinearArgs) -> torch.Tensor | None:
        x_RI, weight_t_IO, bias_O = args.x_RI, args.weight_t_IO, args.bias_O
        n_rows, n_in = x_RI.shape
        n_out = weight_t_IO.shape[1]
        flat_Z = x_RI.reshape(-1).nonzero().squeeze(1)  # row-major; synchronises
        if flat_Z.numel() > args.max_density * x_RI.numel():
            return None
        out_RO = torch.empty(n_rows, n_out, dtype=x_RI.dtype, device=x_RI.device)
        if flat_Z.numel() == 0 or n_out == 0:  # nothing to gather: no launch
            return out_RO.zero_() if bias_O is None else out_RO.copy_(bias_O.expand_as(out_RO))
        rows_Z = flat_Z // n_in
        cols_Z = (flat_Z - rows_Z * n_in).to(torch.int32)
        values_Z = x_RI.reshape(-1)[flat_Z]
        rowptr_R1 = torch.zeros(n_rows + 1, dtype=torch.int64, device=x_RI.device)
        rowptr_R1[1:] = torch.cumsum(torch.bincount(rows_Z, minlength=n_rows), 0)
        grid = (n_rows, triton.cdiv(n_out, _BLOCK_O))
        _event_linear_kernel[grid](
            rowptr_R1,
            cols_Z,
            values_Z,
            weight_t_IO,
            weight_t_IO if bias_O is None else bias_O,
            out_RO,
            n_out,
            HAS_BIAS=bias_O is not None,
            BLOCK_O=_BLOCK_O,
            BLOCK_Z=_BLOCK_Z,
            num_warps=_NUM_WARPS,
        )
        return out_RO


#: The Triton kernel as a :class:`~.protocol.EventKernel` (CUDA, or CPU with ``TRITON_INTERPRET=1``;
#: float32/float64): ``implementation="triton"``, and ``"auto"`` on CUDA.
TRITON = _TritonProvider()
