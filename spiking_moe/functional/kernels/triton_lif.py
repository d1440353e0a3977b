"""Triton kernels for :class:`~spiking_moe.functional.kernels.FusedLIF` on CUDA.

One program per block of ``BLOCK`` neurons runs the whole time loop, carrying the membrane (and,
backward, the adjoint) in registers; every step reads and writes one contiguous row slice of the
time-major ``[T, U]`` arrays, so accesses are coalesced. The surrogate, reset mode, optional
inputs and ``alpha`` are compile-time constants (one specialisation per combination in use).
Kernels are compiled with ``enable_fp_fusion=False`` so ``h = beta * v + x`` rounds like
PyTorch's separate multiply and add, and spikes equal the reference loop exactly.

The provider satisfies :class:`~.protocol.LIFKernel`. The surrogate branch compares the
compile-time id against module constants built from :data:`~.protocol.SURROGATE_IDS`, the
table the provider also looks ids up in, so kernel and table cannot disagree.

float32 and float64 only; under ``implementation="auto"`` half precision runs the reference
loop (see ``lif.py``). With ``TRITON_INTERPRET=1`` set before import, the kernels also run on
CPU tensors through Triton's interpreter (slow; used by the tests on machines without a GPU).

This module imports even where Triton is missing or broken; :func:`unavailable_reason` then
says why the kernels cannot run.
"""

from __future__ import annotations

import os

import torch

from .protocol import SURROGATE_IDS, LIFBackwardArgs, LIFForwardArgs

__all__ = ["TRITON", "unavailable_reason"]

try:
    import triton
    import triton.language as tl
except Exception as error:  # ImportError, or a broken install failing at import
    triton = None
    _IMPORT_ERROR: str | None = f"{type(error).__name__}: {error}"
else:
    _IMPORT_ERROR = None

_DTYPES = (torch.float32, torch.float64)
# Untuned (no GPU was available when this was written): 256 neurons x 2 warps per program.
_BLOCK = 256
_NUM_WARPS = 2


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unavailable_reason(x: torch.Tensor) -> str | None:
    """Why the Triton kernels (this module's and :mod:`.triton_event`'s) cannot run on ``x``,
    or None if they can."""
    if triton is None:
        return f"triton is not importable ({_IMPORT_ERROR})"
    if not (x.is_cuda or (x.device.type == "cpu" and _interpreting())):
        return (
            f"needs a CUDA tensor, got one on {x.device} (set TRITON_INTERPRET=1 before "
            "importing triton to run CPU tensors through its interpreter)"
        )
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype} not supported (float32, float64)"
    return None


if triton is not None:
    # Triton kernels may read only constexpr globals; these are the table's values, one per
    # surrogate, named after it.
    _FAST_SIGMOID = tl.constexpr(SURROGATE_IDS["fast_sigmoid"])
    _ATAN = tl.constexpr(SURROGATE_IDS["atan"])
    _SIGMOID = tl.constexpr(SURROGATE_IDS["sigmoid"])
    _TRIANGLE = tl.constexpr(SURROGATE_IDS["triangle"])
    _BOXCAR = tl.constexpr(SURROGATE_IDS["boxcar"])

    @triton.jit
    def _surrogate_grad(x, SURROGATE: tl.constexpr, ALPHA: tl.constexpr):
        if SURROGATE == _FAST_SIGMOID:
            d = ALPHA * tl.abs(x) + 1.0
            g = 1.0 / (d * d)
        elif SURROGATE == _ATAN:
            u = (1.5707963267948966 * ALPHA) * x
            g = (ALPHA / 2.0) / (1.0 + u * u)
        elif SURROGATE == _SIGMOID:
            sig = 1.0 / (1.0 + tl.exp(-ALPHA * x))
            g = ALPHA * sig * (1.0 - sig)
        elif SURROGATE == _TRIANGLE:
            g = ALPHA * tl.maximum(1.0 - ALPHA * tl.abs(x), 0.0)
        else:
            tl.static_assert(SURROGATE == _BOXCAR, "unknown surrogate id")
            g = tl.where(tl.abs(x) <= 0.5 / ALPHA, ALPHA, 0.0) + 0.0 * x
        return g

    @triton.jit
    def _neurons(beta_ptr, theta_ptr, v0_ptr, n, HAS_V0: tl.constexpr, BLOCK: tl.constexpr):
        # This program's block of neurons: offsets, mask, beta, theta and v0 (zeros if none).
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        beta = tl.load(beta_ptr + offs, mask=mask, other=0.0)
        theta = tl.load(theta_ptr + offs, mask=mask, other=1.0)
        if HAS_V0:
            v0 = tl.load(v0_ptr + offs, mask=mask, other=0.0)
        else:
            v0 = beta * 0.0
        return offs, mask, beta, theta, v0

    @triton.jit
    def _reset(h, s, theta, ZERO: tl.constexpr):
        if ZERO:
            v = h * (1.0 - s)
        else:
            v = h - theta * s
        return v

    @triton.jit
    def _lif_forward_kernel(
        x_ptr,
        beta_ptr,
        theta_ptr,
        v0_ptr,
        s_ptr,
        h_ptr,
        mem_ptr,
        v_final_ptr,
        steps,
        n,
        HAS_V0: tl.constexpr,
        ZERO: tl.constexpr,
        MEM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs, mask, beta, theta, v = _neurons(beta_ptr, theta_ptr, v0_ptr, n, HAS_V0, BLOCK)
        # Pointers advance by one row per step: 64-bit arithmetic, no int32 overflow of t * n.
        x_p = x_ptr + offs
        s_p = s_ptr + offs
        h_p = h_ptr + offs
        m_p = mem_ptr + offs
        for _ in range(steps):
            x = tl.load(x_p, mask=mask, other=0.0)
            h = beta * v + x
            s = tl.where(h - theta > 0.0, 1.0, 0.0).to(h.dtype)
            v = _reset(h, s, theta, ZERO)
            tl.store(h_p, h, mask=mask)
            tl.store(s_p, s, mask=mask)
            if MEM:
                tl.store(m_p, v, mask=mask)
            x_p += n
            s_p += n
            h_p += n
            m_p += n
        tl.store(v_final_ptr + offs, v, mask=mask)

    @triton.jit
    def _lif_backward_kernel(
        gs_ptr,
        gmem_ptr,
        gv_final_ptr,
        h_ptr,
        beta_ptr,
        theta_ptr,
        v0_ptr,
        gx_ptr,
        gv0_ptr,
        gbeta_ptr,
        gtheta_ptr,
        steps,
        n,
        last_row,
        SURROGATE: tl.constexpr,
        ALPHA: tl.constexpr,
        KEEP: tl.constexpr,
        ZERO: tl.constexpr,
        HAS_GMEM: tl.constexpr,
        HAS_GV: tl.constexpr,
        HAS_V0: tl.constexpr,
        PGRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs, mask, beta, theta, v0 = _neurons(beta_ptr, theta_ptr, v0_ptr, n, HAS_V0, BLOCK)
        zeros = beta * 0.0
        if HAS_GV:
            a = tl.load(gv_final_ptr + offs, mask=mask, other=0.0)
        else:
            a = zeros
        gb = zeros
        gt = zeros
        h_p = h_ptr + last_row + offs
        gs_p = gs_ptr + last_row + offs
        gm_p = gmem_ptr + last_row + offs
        gx_p = gx_ptr + last_row + offs
        for i in range(steps):
            h = tl.load(h_p, mask=mask, other=0.0)
            d = h - theta
            s = tl.where(d > 0.0, 1.0, 0.0).to(h.dtype)
            g = _surrogate_grad(d, SURROGATE, ALPHA)
            if HAS_GMEM:
                a += tl.load(gm_p, mask=mask, other=0.0)
            gs = tl.load(gs_p, mask=mask, other=0.0)
            if ZERO:
                gh = gs * g + a * ((1.0 - s) - KEEP * h * g)
            else:
                gh = gs * g + a * (1.0 - KEEP * theta * g)
            tl.store(gx_p, gh, mask=mask)
            if PGRAD:
                # v_{t-1} from h_{t-1}; at t = 0 it is v0.
                has_prev = (
                    offs * 0 + i
                ) < steps - 1  # a tensor: scalar masks upset the interpreter
                hp = tl.load(h_p - n, mask=mask & has_prev, other=0.0)
                sp = tl.where(hp - theta > 0.0, 1.0, 0.0).to(h.dtype)
                vp = tl.where(has_prev, _reset(hp, sp, theta, ZERO), v0)
                gb += gh * vp
                gt += a * (1.0 - s) - gh
            a = gh * beta
            h_p -= n
            gs_p -= n
            gm_p -= n
            gx_p -= n
        tl.store(gv0_ptr + offs, a, mask=mask)
        if PGRAD:
            tl.store(gbeta_ptr + offs, gb, mask=mask)
            tl.store(gtheta_ptr + offs, gt, mask=mask)


class _TritonProvider:
    """The Triton kernels: CUDA tensors (CPU ones under the interpreter), float32/float64."""

    name = "triton"

    def unavailable_reason(self, x: torch.Tensor) -> str | None:
        return unavailable_reason(x)

    def forward(self, args: LIFForwardArgs) -> tuple[torch.Tensor, ...]:
        x_TU, v0_U, beta_U = args.x_TU, args.v0_U, args.beta_U
        steps, n = x_TU.shape
        spikes_TU = torch.empty_like(x_TU)
        h_TU = torch.empty_like(x_TU)
        membrane_TU = torch.empty_like(x_TU) if args.return_membrane else None
        v_U = torch.empty_like(beta_U)
        grid = (triton.cdiv(n, _BLOCK),)
        _lif_forward_kernel[grid](
            x_TU,
            beta_U,
            args.theta_U,
            x_TU if v0_U is None else v0_U,
            spikes_TU,
            h_TU,
            h_TU if membrane_TU is None else membrane_TU,
            v_U,
            steps,
            n,
            HAS_V0=v0_U is not None,
            ZERO=args.zero_reset,
            MEM=args.return_membrane,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
            enable_fp_fusion=False,
        )
        out = (spikes_TU, h_TU, v_U)
        return out + ((membrane_TU,) if membrane_TU is not None else ())

    def backward(
        self, args: LIFBackwardArgs
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        h_TU, beta_U, param_grads = args.h_TU, args.beta_U, args.param_grads
        steps, n = h_TU.shape
        gx_TU = torch.empty_like(h_TU)
        gv0_U = torch.empty_like(beta_U)
        gbeta_U = torch.empty_like(beta_U) if param_grads else None
        gtheta_U = torch.empty_like(beta_U) if param_grads else None
        grid = (triton.cdiv(n, _BLOCK),)
        # Absent optional tensors are passed as any tensor: the kernel never reads them.
        _lif_backward_kernel[grid](
            args.gs_TU,
            h_TU if args.gmem_TU is None else args.gmem_TU,
            beta_U if args.gv_U is None else args.gv_U,
            h_TU,
            beta_U,
            args.theta_U,
            beta_U if args.v0_U is None else args.v0_U,
            gx_TU,
            gv0_U,
            gv0_U if gbeta_U is None else gbeta_U,
            gv0_U if gtheta_U is None else gtheta_U,
            steps,
            n,
            max(steps - 1, 0) * n,
            SURROGATE=SURROGATE_IDS[args.surrogate.name],
            ALPHA=float(args.surrogate.alpha),
            KEEP=0.0 if args.detach_reset else 1.0,
            ZERO=args.zero_reset,
            HAS_GMEM=args.gmem_TU is not None,
            HAS_GV=args.gv_U is not None,
            HAS_V0=args.v0_U is not None,
            PGRAD=param_grads,
            BLOCK=_BLOCK,
            num_warps=_NUM_WARPS,
            enable_fp_fusion=False,
        )
        return gx_TU, gv0_U, gbeta_U, gtheta_U


#: The Triton kernels as a :class:`~.protocol.LIFKernel` (CUDA, or CPU with ``TRITON_INTERPRET=1``;
#: float32/float64): ``implementation="triton"``, and ``"auto"`` on CUDA.
TRITON = _TritonProvider()
