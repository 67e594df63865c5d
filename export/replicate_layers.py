"""Trace three blocks, write N: the exporter's time grows with depth (torch.export and its ONNX
translation walk every layer), while the blocks of this model are the same graph with other
weights. So a deep model is traced at depth 3, and in the traced graph (before weights are bound
or anything is folded) block 1 is cloned for blocks 2 .. N-2 and block 2 becomes block N-1.

A block's nodes are those whose torch.onnx name scope is `model.layers.K`. What a block reads from
outside is, apart from its own past inputs and weights, either the previous block's outputs (the
residual stream) or values every block shares: rotary tables, the mask, and shape values, which
may be computed once in block 0 or read from another layer's past (all pasts have one symbolic
shape, so sharing them is exact). Blocks 1 and 2 must correspond node for node, or
`TemplateMismatch` is raised and the caller traces the whole depth instead.
"""
from __future__ import annotations

import ast
import re

TRACED_DEPTH = 3


class TemplateMismatch(ValueError):
    """Blocks 1 and 2 of the traced graph are not the same graph; trace the whole depth."""


def _scopes(node) -> list[str]:
    return ast.literal_eval(node.metadata_props.get("pkg.torch.onnx.name_scopes", "[]"))


def layer_of(node, scopes: list[str] | None = None) -> int | None:
    """The block a traced node belongs to, from its name scope."""
    for scope in _scopes(node) if scopes is None else scopes:
        if scope.startswith("model.layers."):
            return int(scope.split(".")[2])
    return None


def block_of(graph) -> dict:
    """Each node's block: its name scope's, or for a node directly in the traced forward (a
    residual add or a cache write outside the blocks, as the static-cache graph's loop has them),
    the latest block whose values or past inputs it reads."""
    owner = {value: _layer_index(value.name or "") for value in graph.inputs}  # each block's past
    blocks = {}
    for node in graph:  # in order: producers first
        scopes = _scopes(node)
        layer = layer_of(node, scopes)
        if layer is None and scopes and all(scope in ("", "model") for scope in scopes[:-1]):
            found = [owner[v] for v in node.inputs if v is not None and owner.get(v) is not None]
            layer = max(found) if found else None
        blocks[node] = layer
        for value in node.outputs:
            owner[value] = layer
    return blocks


def _layer_name(name: str, old: int, new: int) -> str:
    """A past/present input or output, or a weight, of block `old` named for block `new`."""
    return re.sub(rf"(?<=[.]){old}(?=[.])", str(new), name, count=1) if _layer_index(name) == old else name


def _layer_index(name: str) -> int | None:
    match = re.match(r"^(?:model\.layers|past_key_values|present)\.(\d+)\.", name)
    return int(match.group(1)) if match else None


class _Template:
    """Block 1 of the traced graph, checked against block 2, and how its inputs map."""

    def __init__(self, graph):
        owner = block_of(graph)
        blocks = {k: [node for node in graph if owner[node] == k] for k in range(TRACED_DEPTH)}
        self.nodes, self.last = blocks[1], blocks[2]
        self.produced = [{out for node in blocks[k] for out in node.outputs} for k in range(TRACED_DEPTH)]
        self.residual = {}  # a value block 1 reads from block 0 -> the value block 2 reads in its place
        if len(self.nodes) != len(self.last) or not self.nodes:
            raise TemplateMismatch(f"blocks 1 and 2 have {len(self.nodes)} and {len(self.last)} nodes")
        for a, b in zip(self.nodes, self.last):
            self._match(a, b)

    def _match(self, a, b) -> None:
        if (a.op_type, a.domain, len(a.inputs), len(a.outputs)) != (b.op_type, b.domain, len(b.inputs), len(b.outputs)):
            raise TemplateMismatch(f"{a.name} ({a.op_type}) and {b.name} ({b.op_type}) differ")
        if {k: str(v) for k, v in a.attributes.items()} != {k: str(v) for k, v in b.attributes.items()}:
            raise TemplateMismatch(f"{a.name} and {b.name} have different attributes")
        for x, y in zip(a.inputs, b.inputs):
            if x is y or (x is not None and y is not None and self._same_role(x, y)):
                continue
            raise TemplateMismatch(f"{a.name} reads {x.name if x else None} where {b.name} reads "
                                   f"{y.name if y else None}")

    def _same_role(self, x, y) -> bool:
        if x in self.produced[1]:
            return y in self.produced[2]
        if x in self.produced[0] and y in self.produced[1]:
            self.residual[x] = y
            return True
        if _layer_index(x.name or "") == 1:
            return (y.name or "") == _layer_name(x.name, 1, 2)
        # two values computed outside the blocks the same way from the same inputs (the cache
        # writes' indices, each block's past length): the clones may read block 1's
        return self._equivalent(x, y, False, 0)

    def _equivalent(self, x, y, shape_of: bool, depth: int) -> bool:
        """x and y computed by the same ops from the same inputs, outside every block; a past input
        may stand for another's only where its shape is read (all pasts share one shape)."""
        if x is y:
            return True
        if depth > 40 or any(x in produced or y in produced for produced in self.produced):
            return False
        a, b = x.producer(), y.producer()
        if a is None or b is None:
            if a is not None or b is not None:
                return False
            if x.is_graph_input() and y.is_graph_input():
                return shape_of and _layer_index(x.name or "") is not None and _layer_index(y.name or "") is not None
            return _same_constant(x, y)
        if (a.op_type, a.domain, len(a.inputs)) != (b.op_type, b.domain, len(b.inputs)):
            return False
        if {k: str(v) for k, v in a.attributes.items()} != {k: str(v) for k, v in b.attributes.items()}:
            return False
        return all((u is None and v is None) or (u is not None and v is not None and
                                                 self._equivalent(u, v, a.op_type == "Shape", depth + 1))
                   for u, v in zip(a.inputs, b.inputs))


def _same_constant(x, y) -> bool:
    """Two initializers with the same small value (the exporter writes one per use)."""
    import numpy as np

    if x.const_value is None or y.const_value is None or x.const_value.nbytes > 1024:
        return False
    return x.const_value.dtype == y.const_value.dtype and np.array_equal(x.const_value.numpy(), y.const_value.numpy())


def replicate_layers(model, depth: int) -> None:
    """Turn the graph of a depth-3 trace (`model`, an onnx_ir Model, weights not yet bound) into
    the graph of `depth` blocks, in place. Raises TemplateMismatch when it cannot."""
    if depth <= TRACED_DEPTH:
        return
    graph = model.graph
    template = _Template(graph)
    _rename_last(graph, template, depth - 1)  # first, so that block 2's names are free for its clone
    previous = {value: value for value in template.produced[1]}  # block 1's values as the last clone has them
    anchor = template.nodes[-1]
    for layer in range(2, depth - 1):
        clones, previous = _clone(graph, template, previous, layer)
        graph.insert_after(anchor, clones)
        anchor = clones[-1]
    for node in template.last:  # the last block reads the last clone's residual stream
        for index, value in enumerate(node.inputs):
            if value in template.produced[1]:
                node.replace_input_with(index, previous[value])
    _order_io(graph)
    graph.sort()


def _clone(graph, template: _Template, previous: dict, layer: int):
    """Block 1's nodes as block `layer`, reading the residual stream from `previous`."""
    import onnx_ir as ir

    values, nodes = {}, []
    for node in template.nodes:
        inputs = [_input(graph, template, previous, values, value, layer) for value in node.inputs]
        clone = ir.Node(node.domain, node.op_type, inputs, attributes=list(node.attributes.values()),
                        num_outputs=len(node.outputs), name=f"{node.name}__layer{layer}", version=node.version)
        for key, text in node.metadata_props.items():
            clone.metadata_props[key] = text.replace("model.layers.1", f"model.layers.{layer}")
        for old, new in zip(node.outputs, clone.outputs):
            new.name = _layer_name(old.name, 1, layer) if old.is_graph_output() else f"{old.name}__layer{layer}"
            new.shape, new.type = old.shape, old.type
            values[old] = new
            if old.is_graph_output():
                graph.outputs.append(new)
        nodes.append(clone)
    return nodes, values


def _input(graph, template: _Template, previous: dict, values: dict, value, layer: int):
    """What a clone of block 1 reads where block 1 reads `value`."""
    if value is None:
        return None
    if value in values:
        return values[value]
    if value in template.residual:
        return previous[template.residual[value]]
    if _layer_index(value.name or "") != 1:
        return value  # shared by every block
    return _layer_value(graph, value, layer)


def _layer_value(graph, value, layer: int):
    """Block `layer`'s own past input or weight, made once like block 1's."""
    import onnx_ir as ir

    name = _layer_name(value.name, 1, layer)
    if value.is_graph_input():
        existing = next((v for v in graph.inputs if v.name == name), None)
        if existing is None:
            existing = ir.Value(name=name, shape=value.shape, type=value.type)
            graph.inputs.append(existing)
        return existing
    if name not in graph.initializers:
        graph.register_initializer(ir.Value(name=name, shape=value.shape, type=value.type,
                                            const_value=value.const_value))
    return graph.initializers[name]


def _rename_last(graph, template: _Template, last: int) -> None:
    """Block 2 becomes block `last`: its past inputs, present outputs and weights take that
    block's names."""
    for node in template.last:
        for key, text in node.metadata_props.items():
            node.metadata_props[key] = text.replace("model.layers.2", f"model.layers.{last}")
    for value in list(graph.inputs) + list(graph.outputs):
        if _layer_index(value.name or "") == 2:
            value.name = _layer_name(value.name, 2, last)
    for name in [n for n in graph.initializers if _layer_index(n) == 2]:
        value = graph.initializers.pop(name)
        value.name = _layer_name(name, 2, last)
        graph.register_initializer(value)


def _order_io(graph) -> None:
    """Graph inputs and outputs in the signature's order: the others first, then by block."""
    def key(value):
        name = value.name or ""
        index = _layer_index(name)
        return (index is not None, index or 0, name.endswith(".value"))

    for values in (graph.inputs, graph.outputs):
        ordered = sorted(values, key=key)  # stable for the others: ids, mask, logits as traced
        values.clear()
        values.extend(ordered)
