"""Per-layer-type math, in one registry keyed by layer type.

Credit is assigned per block, and most rules never look inside one. Two kinds of rule change how
an error travels *within* the network: feedback alignment sends it down through a fixed random
matrix B in place of W^T, and NAN through an attention kernel M. They do it without touching any
block's forward: while such a rule runs (:func:`swapped_input_gradients`), every layer with weights
computes its usual output, and its backward pass uses the rule's kernel for the *input* gradient;
its weight and bias gradients stay the layer's own (dL/dW = delta x^T). Every other layer in a
block -- batch norm, activations, pooling, dropout, the residual add -- keeps its local backward.

No module is patched: :class:`ReplacedWeightLayers` is a ``TorchFunctionMode`` that, while active,
routes the one functional call through which a weight layer computes its output (``F.linear``,
``F.conv2d``, ... recognised by the identity of the layer's weight) to the rule's replacement.
Such modes nest, and the blocks' own forward code runs as always around the intercepted call.

The registry sorts module types into three kinds:

* **weight layers** (``nn.Linear``, ``nn.Conv1d/2d/3d`` with any stride, padding, dilation, groups,
  with or without bias): a :class:`WeightOp` knows their forward and the three parts of their backward;
* **local layers**: their own backward pass is local to the layer (activations, normalisation,
  pooling, dropout, reshapes), so it is used as it is;
* **containers**: modules whose forward only composes their children, adding where they branch
  (``nn.Sequential``, the residual unit of ``--arch resnet``).

A module type of none of these kinds is refused, with one line naming it, by the rules that need
the math (:func:`check_layer_math`); :func:`register_layer` makes a new type one registration.
Lookup follows the class hierarchy, so a subclass of a registered type is covered.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import UserError

Kind = Literal["weight", "local", "container"]


@dataclass(frozen=True)
class WeightOp:
    """How a layer with a weight computes y = op(x; W, b), and the parts of its backward pass.

    ``input_gradient(module, x, kernel, grad_out)`` is the transposed operation with ``kernel`` (of W's
    shape) in place of W: with kernel = W it is autograd's dL/dx. ``parameter_gradients``
    gives dL/dW and dL/db (None without a bias). ``feedback_fan_in`` is how many output units
    reach one input unit through the transposed operation (the fan-in of a feedback kernel).
    """

    forward: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    input_gradient: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    parameter_gradients: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    feedback_fan_in: Callable[[nn.Module], int]
    #: the torch function through which the layer's own forward computes its output, called as
    #: ``functional(input, weight, ...)``: a rule replaces the layer's math by intercepting that call
    #: (:class:`ReplacedWeightLayers`). Required for a registration.
    functional: Callable[..., torch.Tensor] | None = None
    #: applied to the input of that call before the op, with autograd's own (local) backward: e.g.
    #: the 'same' padding a conv leaves to its call
    prepare_input: Callable[[nn.Module, torch.Tensor], torch.Tensor] = lambda module, x: x


_KINDS: dict[type, Kind] = {}
_WEIGHT_OPS: dict[type, WeightOp] = {}


def register_layer(cls: type, kind: Kind, op: WeightOp | None = None) -> None:
    """Declare how rules that need per-layer math treat modules of type ``cls`` (and its subclasses).

    ``kind="local"`` for a layer whose autograd backward involves only its own units (elementwise
    functions, normalisation, pooling); ``"container"`` for a module whose forward only composes its
    children; ``"weight"`` with a :class:`WeightOp` for a layer whose input gradient a rule may replace.
    """
    if kind not in ("weight", "local", "container"):
        raise ValueError(f"unknown layer kind {kind!r}")
    if (kind == "weight") != (op is not None):
        raise ValueError("a weight layer needs a WeightOp, and only a weight layer takes one")
    if op is not None and op.functional is None:
        raise ValueError("a WeightOp needs its functional: the torch function the layer's forward calls "
                         "as functional(input, weight, ...)")
    _KINDS[cls] = kind
    if op is not None:
        _WEIGHT_OPS[cls] = op


def _lookup(table: dict, module: nn.Module):
    for cls in type(module).__mro__:
        if cls in table:
            return table[cls]
    return None


def layer_kind(module: nn.Module) -> Kind | None:
    return _lookup(_KINDS, module)


def weight_op(module: nn.Module) -> WeightOp | None:
    return _lookup(_WEIGHT_OPS, module)


# ----- weight layers ---------------------------------------------------------------------------
# A WeightOp's parts take any nn.Module, as the registry stores them; each is registered for (and
# so only called with) its own layer type, which the casts below name for the type checker.
def _linear_forward(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight, cast(nn.Linear, module).bias)


def _linear_input_gradient(module: nn.Module, x: torch.Tensor, kernel: torch.Tensor,
                           grad_out: torch.Tensor) -> torch.Tensor:
    return (grad_out @ kernel).view(x.shape)


def _linear_parameter_gradients(module: nn.Module, x: torch.Tensor,
                                grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    rows = grad_out.reshape(-1, grad_out.shape[-1])
    grad_weight = rows.t() @ x.reshape(-1, x.shape[-1])
    return grad_weight, rows.sum(0) if module.bias is not None else None


LINEAR = WeightOp(
    forward=_linear_forward,
    input_gradient=_linear_input_gradient,
    parameter_gradients=_linear_parameter_gradients,
    feedback_fan_in=lambda module: cast(nn.Linear, module).out_features,
    functional=F.linear,
)


def _pads_itself(module: nn.modules.conv._ConvNd) -> bool:
    """Symmetric zero padding: the convolution op applies it (and its transposes account for it)."""
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _conv_padding(module: nn.modules.conv._ConvNd) -> tuple[int, ...] | int:
    padding = module.padding
    if not _pads_itself(module):
        return 0
    assert not isinstance(padding, str)  # _pads_itself is False for string padding ('same', 'valid')
    return padding


def _pad_conv_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The padding that neither the op nor the layer's own call applies: 'same' zero padding (possibly
    asymmetric). A conv pads itself, before its call, with any mode other than zeros; symmetric zero
    padding (numbers) is the op's."""
    module = cast(nn.modules.conv._ConvNd, layer)  # registered for (so only called with) convolutions
    if module.padding_mode != "zeros" or module.padding != "same":
        return x
    pairs = []
    for d, k in zip(module.dilation, module.kernel_size):
        total = d * (k - 1)
        pairs.append((total // 2, total - total // 2))
    pad = [side for pair in reversed(pairs) for side in pair]  # F.pad starts from the last dimension
    if not any(pad):
        return x
    return F.pad(x, pad, mode="constant")


def _conv_op(dims: int) -> WeightOp:
    """Convolution in ``dims`` dimensions, any stride, padding, dilation and groups, bias or not.

    Its backward parts are the pieces of aten's ``convolution_backward`` that autograd's own conv
    backward computes, on the same tensors: with the kernel equal to W they are bit-identical to it.
    """
    convolution = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]

    def forward(module, x, weight):
        return convolution(x, weight, module.bias, module.stride, _conv_padding(module), module.dilation,
                           module.groups)

    def backward(module, x, weight, grad_out, mask):
        padding = _conv_padding(module) or (0,) * dims
        bias_sizes = [module.out_channels] if module.bias is not None else None
        return torch.ops.aten.convolution_backward(grad_out, x, weight, bias_sizes, module.stride, padding,
                                                   module.dilation, False, (0,) * dims, module.groups, mask)

    def input_gradient(module, x, kernel, grad_out):
        return backward(module, x, kernel, grad_out, (True, False, False))[0]

    def parameter_gradients(module, x, grad_out):
        _, grad_weight, grad_bias = backward(module, x, module.weight, grad_out, (False, True, module.bias is not None))
        return grad_weight, grad_bias

    def fan_in(module):
        # One input channel is reached by out_channels / groups output channels, each over the kernel's area.
        return module.out_channels // module.groups * math.prod(module.kernel_size)

    return WeightOp(forward, input_gradient, parameter_gradients, fan_in, functional=convolution,
                    prepare_input=_pad_conv_input)


class _SwappedInputGradient(torch.autograd.Function):
    """y = op(x; W, b) whose backward sends the error to x through ``kernel()`` instead of W.

    The kernel is asked for only when the input gradient is needed (not for a layer fed by data),
    so a rule whose kernel costs something to compute pays it only where it is used.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, kernel: Callable[[], torch.Tensor], op: WeightOp, module: nn.Module):
        ctx.save_for_backward(x)
        ctx.kernel, ctx.op, ctx.module = kernel, op, module
        return op.forward(module, x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        op, module = ctx.op, ctx.module
        grad_x = op.input_gradient(module, x, ctx.kernel(), grad_out) if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            grad_weight, grad_bias = op.parameter_gradients(module, x, grad_out)
        return grad_x, grad_weight, grad_bias, None, None, None


#: ``replacement(name, layer, its WeightOp, x)``: the layer's output, from ``x``, the input of its op
Replacement = Callable[[str, nn.Module, WeightOp, torch.Tensor], torch.Tensor]

class _Running(threading.local):
    """Per thread, the layers (by id) whose replacement is running: the calls inside one are not to be replaced again."""

    def __init__(self):
        self.layers: set[int] = set()


_running = _Running()


class ReplacedWeightLayers(TorchFunctionMode):
    """While active, every registered weight layer among ``named_modules`` computes its output as
    ``replacement(name, layer, its WeightOp, x)``, ``name`` as ``named_modules`` gives it.

    A context manager that touches no module: it intercepts the call through which the layer's own
    forward computes its output (:attr:`WeightOp.functional`, e.g. ``F.linear(x, W, b)``), recognised
    by the identity of the layer's weight, and hands the replacement that call's input (after
    :attr:`WeightOp.prepare_input`). The blocks' forward code runs as always around it. Every other
    torch call passes through, and none is intercepted after the way out.

    Such modes nest. A layer is replaced by the innermost active mode that holds it; the calls made
    inside a replacement (its own op among them) reach the outer modes, which pass that layer's
    calls through instead of replacing it a second time.
    """

    def __init__(self, named_modules: Iterable[tuple[str, nn.Module]], replacement: Replacement):
        super().__init__()
        self.replacement = replacement
        self.layers: dict[int, tuple[str, nn.Module, WeightOp]] = {}  # by id of the weight
        for name, module in named_modules:
            op = weight_op(module)
            if op is not None:
                self.layers.setdefault(id(module.weight), (name, module, op))
        self.functionals = {op.functional for _, _, op in self.layers.values()}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in self.functionals and len(args) > 1:
            layer = self.layers.get(id(args[1]))
            if layer is not None and layer[2].functional is func:
                name, module, op = layer
                if id(module) not in _running.layers:
                    _running.layers.add(id(module))
                    try:
                        return self.replacement(name, module, op, op.prepare_input(module, args[0]))
                    finally:
                        _running.layers.discard(id(module))
        return func(*args, **kwargs)


KernelOf = Callable[[str, nn.Module], torch.Tensor]


def _swapped_forward(kernel_of: KernelOf, name: str, module: nn.Module, op: WeightOp,
                     x: torch.Tensor) -> torch.Tensor:
    kernel = functools.partial(kernel_of, name, module)
    return _SwappedInputGradient.apply(x, module.weight, module.bias, kernel, op, module)


def swapped_input_gradients(net: nn.Module, kernel_of: KernelOf) -> ReplacedWeightLayers:
    """A context manager: while inside, every weight layer of ``net`` sends errors down through ``kernel_of(name, layer)``.

    The forward values are unchanged (each layer computes op(x; W, b)); only the input gradient of
    each weight layer uses the kernel, which is asked for during the backward pass, with the
    weights of the forward. ``name`` is the layer's name in ``net.named_modules()``.
    The blocks' own forward code runs as always (:class:`ReplacedWeightLayers`).
    """
    return ReplacedWeightLayers(net.named_modules(), functools.partial(_swapped_forward, kernel_of))


def weight_layers(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every registered weight layer of ``net``, in ``named_modules`` order."""
    return [(name, module) for name, module in net.named_modules() if weight_op(module) is not None]


# ----- checking a network ------------------------------------------------------------------------
def unsupported_layer(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module inside ``module`` (itself included) whose math is unknown: (path, module)."""
    kind = layer_kind(module)
    if kind is None:
        return "", module
    if kind == "container":
        for name, child in module.named_children():
            found = unsupported_layer(child)
            if found is not None:
                path, bad = found
                return (f"{name}.{path}" if path else name), bad
        return None
    if kind == "local" and any(True for _ in module.children()):
        # A local layer with children would hide their math behind its own forward.
        return "", module
    return None


def check_layer_math(layers: Sequence[nn.Module], rule: str, why: str) -> None:
    """Raise a one-line UserError naming the first block holding a layer type with no registered math."""
    for l, block in enumerate(layers):
        found = unsupported_layer(block)
        if found is not None:
            path, bad = found
            where = f"block {l}" + (f" ({path})" if path else "")
            raise UserError(f"rule {rule} {why}; {where} is a {type(bad).__name__}, a layer type with no "
                            f"registered math (localcredit.nets.layers.register_layer declares one)")


# ----- what is registered --------------------------------------------------------------------------
register_layer(nn.Linear, "weight", LINEAR)
_cls: type
for _dims, _cls in enumerate((nn.Conv1d, nn.Conv2d, nn.Conv3d), start=1):
    register_layer(_cls, "weight", _conv_op(_dims))

register_layer(nn.Sequential, "container")

LOCAL_LAYERS: tuple[type, ...] = (
    # elementwise functions
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softsign, nn.Tanhshrink,
    nn.Softmax, nn.LogSoftmax,
    # normalisation: per unit (channel) statistics and affine parameters
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm, nn.LayerNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    # pooling and resampling
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample,
    # dropout, reshapes, padding
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Flatten, nn.Unflatten,
    nn.ZeroPad2d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d,
)
for _cls in LOCAL_LAYERS:
    register_layer(_cls, "local")
