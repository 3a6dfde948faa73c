"""Any traceable model as blocks: its forward cut at named submodules with ``torch.fx``.

``lc.blocknet(model, cut_at=["layer1", "layer2", "layer3"], ...)`` traces ``model`` (a ResNet written
the usual way, with its own forward) into one graph of operations, and cuts that graph right after
the last operation of each named submodule. Each piece is a :class:`TracedBlock`, an ``fx.GraphModule``
that runs the model's own forward code between two cuts and calls the model's own layers (shared,
not copied); the piece after the last cut is the head.

The trace stops at layers (modules it does not look inside): the types the layer registry knows
as weight or local layers (:mod:`localcredit.nets.layers`), any module that owns parameters itself,
and torch's own modules, as ``torch.fx`` does. A traced block is a container of those layers, so a
rule that needs per-layer math checks each of them as it checks the children of an ``nn.Sequential``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from torch import fx, nn

from ..errors import UserError, did_you_mean
from .layers import layer_kind, register_layer


class TracedBlock(fx.GraphModule):
    """A piece of a traced model's forward: one tensor in, one tensor out, the model's layers as its children."""


class Scope(nn.Module):
    """A submodule path inside a :class:`TracedBlock` (``layer1.0`` in ``layer1.0.conv1``): holds layers, runs none."""


register_layer(TracedBlock, "container")
register_layer(Scope, "container")


class _LayerTracer(fx.Tracer):
    """Traces through containers and the model's own modules; stops at layers."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        kind = layer_kind(module)
        if kind is not None:
            return kind != "container"
        if any(True for _ in module.parameters(recurse=False)):
            return True  # it owns weights: a layer in itself, whose type a rule may need to know
        return super().is_leaf_module(module, qualified_name)


def trace_blocks(model: nn.Module, cut_at: Sequence[str]) -> list[fx.GraphModule]:
    """``model``'s forward cut after each submodule of ``cut_at``: ``len(cut_at)`` blocks, then the head."""
    model_name = type(model).__name__
    cut_at = _checked_names(model, cut_at)
    try:
        graph = _LayerTracer().trace(model)
    except Exception as exc:  # torch.fx raises TraceError, TypeError, AttributeError, ...: each says why
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"torch.fx cannot trace {model_name}'s forward: {reason} (blocknet(cut_at=...) needs a "
                        f"forward torch.fx can trace: no Python control flow on tensor values)") from None
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UserError(f"{model_name}'s forward takes {len(inputs)} inputs "
                        f"({', '.join(n.name for n in inputs)}); blocknet cuts a forward of one input")
    output = nodes[-1]
    if not isinstance(output.args[0], fx.Node):
        raise UserError(f"{model_name}'s forward returns {type(output.args[0]).__name__}; blocknet needs it to "
                        f"return one tensor, the logits")
    ends = [_last_operation(model_name, nodes, name) for name in cut_at]
    for (before, end_before), (name, end) in itertools.pairwise(zip(cut_at, ends)):
        if end <= end_before:
            raise UserError(f"cut_at must name submodules in the order {model_name}'s forward runs them, each "
                            f"ending after the one before: {name!r} does not end after {before!r}")
    position = {node: i for i, node in enumerate(nodes)}
    carried = [_carried_value(model_name, nodes, position, name, end) for name, end in zip(cut_at, ends)]
    bounds = [0, *(end + 1 for end in ends), len(nodes) - 1]
    pieces = []
    for k in range(len(bounds) - 1):
        into = carried[k - 1] if k > 0 else None
        out = carried[k] if k < len(carried) else output.args[0]
        pieces.append(_piece(model, model_name, nodes[bounds[k]:bounds[k + 1]], into, out))
    return pieces


def _checked_names(model: nn.Module, cut_at: Sequence[str]) -> list[str]:
    if isinstance(cut_at, str) or not all(isinstance(name, str) for name in cut_at):
        raise UserError(f"cut_at must be a list of submodule names, e.g. ['layer1', 'layer2']; got {cut_at!r}")
    names = [name for name, _ in model.named_modules() if name]
    for name in cut_at:
        if name not in names:
            children = ", ".join(name for name, _ in model.named_children())
            raise UserError(f"{type(model).__name__} has no submodule {name!r}{did_you_mean(name, names)}; "
                            f"its submodules are {children} (and the dotted paths inside them, e.g. layer1.0)")
    if len(set(cut_at)) != len(cut_at):
        raise UserError(f"cut_at names a submodule twice: {list(cut_at)}")
    return list(cut_at)


def _last_operation(model_name: str, nodes: list[fx.Node], name: str) -> int:
    """Position of the last operation that the call of submodule ``name`` runs."""
    inside = [i for i, node in enumerate(nodes) if name in node.meta.get("nn_module_stack", {})]
    again = any(key.startswith(name + "@") for node in nodes for key in node.meta.get("nn_module_stack", {}))
    if not inside:
        raise UserError(f"{model_name}'s forward never runs an operation of {name!r}: nothing to cut after")
    if again:
        raise UserError(f"{model_name}'s forward calls {name!r} more than once; cut at a submodule it calls once")
    return inside[-1]


def _carried_value(model_name: str, nodes: list[fx.Node], position: dict[fx.Node, int], name: str,
                   end: int) -> fx.Node:
    """The one value computed up to ``end`` that the operations after it use."""
    live = [node for node in nodes[:end + 1] if node.op != "get_attr"
            and any(position[user] > end for user in node.users)]
    if len(live) != 1:
        names = ", ".join(node.name for node in live) or "none"
        raise UserError(f"cutting {model_name}'s forward after {name!r} leaves {len(live)} values for the rest "
                        f"({names}); a cut must pass on one tensor: cut where only that submodule's output "
                        f"flows on")
    return live[0]


def _piece(model: nn.Module, model_name: str, nodes: list[fx.Node], into: fx.Node | None,
           out: fx.Node) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if into is not None:
        env[into] = graph.placeholder(into.name)

    def value(node: fx.Node) -> fx.Node:
        if node not in env and node.op == "get_attr":  # read where it is used, in every piece that uses it
            env[node] = graph.node_copy(node)
        return env[node]

    for node in nodes:
        env[node] = graph.node_copy(node, value)
    graph.output(value(out))
    graph.lint()
    read = [node.target for node in graph.nodes if node.op == "get_attr" and _is_parameter(model, node.target)]
    if read:
        # Weights the forward uses itself, outside any layer: no rule can see how they act. Rules that
        # need per-layer math refuse this piece (an unregistered type); the others train it as it is.
        block = fx.GraphModule(model, graph, class_name=f"parameter {read[0]} used by {model_name}.forward "
                                                         f"outside a layer")
    else:
        block = TracedBlock(model, graph, class_name="TracedBlock")
    _scoped(block)
    return block


def _is_parameter(model: nn.Module, target: str) -> bool:
    try:
        model.get_parameter(target)
    except AttributeError:
        return False
    return True


def _scoped(module: nn.Module) -> None:
    """Make the bare path holders that ``fx.GraphModule`` creates :class:`Scope` containers, in place."""
    for name, child in list(module.named_children()):
        if type(child) is nn.Module:
            scope = Scope()
            scope._modules.update(child._modules)
            scope._parameters.update(child._parameters)
            scope._buffers.update(child._buffers)
            setattr(module, name, scope)
            _scoped(scope)
