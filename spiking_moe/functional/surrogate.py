r"""Heaviside spike functions with surrogate gradients.

Forward, every surrogate computes the same step :math:`H(x) = 1` if :math:`x > 0` else 0
(strictly greater, as snnTorch and Norse: a membrane exactly at threshold does not fire).
Backward replaces :math:`dH/dx` by the derivative of a smooth primitive :math:`P_\alpha`:

============  ====================================================  ========================================  =====
name          surrogate derivative :math:`g_\alpha(x)`              smooth primitive :math:`P_\alpha`         alpha
============  ====================================================  ========================================  =====
fast_sigmoid  :math:`1 / (1 + \alpha|x|)^2` (SuperSpike)            :math:`x / (1 + \alpha|x|)`               25
atan          :math:`(\alpha/2) / (1 + (\pi\alpha x/2)^2)`          :math:`\arctan(\pi\alpha x/2)/\pi + 1/2`  2
sigmoid       :math:`\alpha\sigma(\alpha x)(1-\sigma(\alpha x))`    :math:`\sigma(\alpha x)`                  25
triangle      :math:`\alpha\max(0, 1 - \alpha|x|)`                  piecewise quadratic                       1
boxcar        :math:`\alpha` if :math:`|x| \le 1/(2\alpha)` else 0  clamped ramp                              1
============  ====================================================  ========================================  =====

The first three equal ``snntorch.surrogate.fast_sigmoid(slope)``, ``atan(alpha)`` and
``sigmoid(slope)`` with the same defaults. snnTorch's ``triangular`` is not a triangle (its
gradient is ``+-threshold``), so ``triangle`` here follows the usual definition (Esser et al.
2016; SpikingJelly's ``PiecewiseLeakyReLU`` family) with unit area.

Each surrogate is a top-level :class:`torch.autograd.Function` that shares one body
(:class:`SurrogateFunction`) and adds only its ``derivative`` and ``primitive``, so modules that
hold one pickle and ``torch.compile`` cleanly; :class:`Surrogate` names one with its ``alpha``
(the table's default when none is given).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "SURROGATES",
    "Atan",
    "Boxcar",
    "FastSigmoid",
    "Sigmoid",
    "Surrogate",
    "SurrogateFunction",
    "Triangle",
    "resolve_surrogate",
    "spike",
]


def _heaviside(x: torch.Tensor) -> torch.Tensor:
    return (x > 0).to(x.dtype)


class SurrogateFunction(torch.autograd.Function):
    """The shared body of every surrogate: Heaviside forward, ``grad * derivative(x)`` backward.

    A subclass supplies only ``derivative(x, alpha)`` (the surrogate :math:`g_\alpha`) and
    ``primitive(x, alpha)`` (its smooth antiderivative :math:`P_\alpha`, for tests and plots);
    ``apply(x, alpha)`` returns the spikes.
    """

    @staticmethod
    def forward(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return _heaviside(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.alpha = inputs[1]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        derivative = cls.derivative

        # A plain function per subclass, bound to its derivative: autograd calls backward with
        # the context only, and torch.compile (compiled autograd included) traces a
        # staticmethod, not a classmethod.
        def backward(ctx, grad_spikes):
            (x,) = ctx.saved_tensors
            return grad_spikes * derivative(x, ctx.alpha), None

        backward.__qualname__ = f"{cls.__qualname__}.backward"
        cls.backward = staticmethod(backward)

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        raise NotImplementedError

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        raise NotImplementedError


class FastSigmoid(SurrogateFunction):
    """SuperSpike / fast-sigmoid surrogate (Zenke & Ganguli 2018)."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return 1.0 / (alpha * x.abs() + 1.0) ** 2

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return x / (1.0 + alpha * x.abs())


class Atan(SurrogateFunction):
    """Arc-tangent surrogate (Fang et al. 2021)."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.atan(math.pi / 2.0 * alpha * x) / math.pi + 0.5


class Sigmoid(SurrogateFunction):
    """Logistic surrogate."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        sig = torch.sigmoid(alpha * x)
        return alpha * sig * (1.0 - sig)

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.sigmoid(alpha * x)


class Triangle(SurrogateFunction):
    """Triangular surrogate of unit area and half-width ``1/alpha``."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return alpha * torch.clamp(1.0 - alpha * x.abs(), min=0.0)

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        u = torch.clamp(alpha * x, -1.0, 1.0)
        return 0.5 + u - 0.5 * u * u.abs()


class Boxcar(SurrogateFunction):
    """Rectangular surrogate of unit area and width ``1/alpha``."""

    @staticmethod
    def derivative(x: torch.Tensor, alpha: float) -> torch.Tensor:
        # Inclusive edge, like the clamp in the primitive.
        return alpha * (x.abs() <= 0.5 / alpha).to(x.dtype)

    @staticmethod
    def primitive(x: torch.Tensor, alpha: float) -> torch.Tensor:
        return torch.clamp(alpha * x, -0.5, 0.5) + 0.5


#: name -> (autograd Function, default alpha)
SURROGATES: dict[str, tuple[type[SurrogateFunction], float]] = {
    "fast_sigmoid": (FastSigmoid, 25.0),
    "atan": (Atan, 2.0),
    "sigmoid": (Sigmoid, 25.0),
    "triangle": (Triangle, 1.0),
    "boxcar": (Boxcar, 1.0),
}


@dataclass(frozen=True)
class Surrogate:
    """A named surrogate with its sharpness ``alpha``; callable as the spike function.

    Picklable and hashable, so it can be stored on modules and passed to snnTorch as
    ``spike_grad``.

    Args:
        name: a key of :data:`SURROGATES`.
        alpha: the sharpness, a finite number > 0; None (the default) takes the name's default
            from :data:`SURROGATES`.

    Raises:
        ValueError: an unknown name or an alpha that is not a finite number > 0.

    Example:
        >>> fn = Surrogate("atan")
        >>> fn.alpha
        2.0
        >>> fn(torch.tensor([-0.5, 0.0, 0.5]))
        tensor([0., 0., 1.])
    """

    name: str = "fast_sigmoid"
    alpha: float | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in SURROGATES:
            raise ValueError(f"unknown surrogate {self.name!r}; valid names: {sorted(SURROGATES)}")
        alpha = SURROGATES[self.name][1] if self.alpha is None else self.alpha
        if (
            isinstance(alpha, bool)
            or not (isinstance(alpha, (int, float)) and math.isfinite(alpha))
            or alpha <= 0
        ):
            raise ValueError(f"surrogate alpha must be a finite number > 0, got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))  # frozen: set once, here

    @property
    def function(self) -> type[SurrogateFunction]:
        return SURROGATES[self.name][0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.function.apply(x, self.alpha)

    def derivative(self, x: torch.Tensor) -> torch.Tensor:
        """The surrogate dH/dx at ``x`` (used by fused backward passes)."""
        return self.function.derivative(x, self.alpha)


def resolve_surrogate(
    surrogate: str | Surrogate = "fast_sigmoid", alpha: float | None = None
) -> Surrogate:
    """Turn a name (with optional ``alpha``, else the default) or a Surrogate into a Surrogate.

    Args:
        surrogate: a key of :data:`SURROGATES`, or a :class:`Surrogate`, returned as it is.
        alpha: the sharpness for a name; None takes the name's default. With a
            :class:`Surrogate` it must be None or equal to the surrogate's own ``alpha``.

    Returns:
        The :class:`Surrogate` (name and a finite ``alpha > 0``), callable as the spike
        function.

    Raises:
        ValueError: an unknown name, an ``alpha`` that is not a finite number > 0, or an
            ``alpha`` that conflicts with the given :class:`Surrogate`'s.

    Example:
        >>> resolve_surrogate("triangle")
        Surrogate(name='triangle', alpha=1.0)
        >>> resolve_surrogate(Surrogate("atan", 4.0)).alpha
        4.0
    """
    if isinstance(surrogate, Surrogate):
        if alpha is not None and alpha != surrogate.alpha:
            raise ValueError(
                f"alpha={alpha} conflicts with the Surrogate's own alpha={surrogate.alpha}"
            )
        return surrogate
    return Surrogate(surrogate, alpha)


def spike(
    x: torch.Tensor, surrogate: str | Surrogate = "fast_sigmoid", alpha: float | None = None
) -> torch.Tensor:
    """Heaviside of ``x`` with the named surrogate gradient.

    Args:
        x: membrane minus threshold, any shape; a spike where ``x > 0``.
        surrogate: a key of :data:`SURROGATES` or a :class:`Surrogate`, as in
            :func:`resolve_surrogate`.
        alpha: the surrogate's sharpness; None takes the default (or the
            :class:`Surrogate`'s own).

    Returns:
        Spikes, the shape and dtype of ``x``: 1 where ``x > 0``, else 0. Backward passes
        ``grad * g(x)``, the surrogate derivative of the module docstring's table.

    Example:
        >>> x = torch.tensor([-0.1, 0.0, 0.2], requires_grad=True)
        >>> s = spike(x, "boxcar", alpha=2.0)
        >>> s
        tensor([0., 0., 1.], grad_fn=<BoxcarBackward>)
        >>> s.sum().backward()
        >>> x.grad
        tensor([2., 2., 2.])
    """
    return resolve_surrogate(surrogate, alpha)(x)
