"""Weights for a graph traced without them: the exporter traces a model whose parameters live on
PyTorch's meta device (shapes only), and each initializer of the resulting graph gets a lazy value
that reads its tensor from the weights (a checkpoint on disk, or a model in memory) only
when the graph is written. So an export holds one tensor at a time, whatever the model's size.

The exporter writes a Linear as MatMul(x, Transpose(W)); today's optimizer folds that Transpose
into a transposed copy of every weight, all in memory at once. `fold_weight_transposes` does the
same fold lazily: the new initializer transposes its tensor when it is read.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from models.precision import Precision
from models.rotary import inverse_frequencies
from models.weights import ModelWeights, shape_of

MODULE_PREFIX = "model."  # the traced wrapper holds the Transformer as .model
RECIPE = "weight_recipe"  # the key of an initializer's WeightRecipe in its onnx_ir Value.meta


@dataclass(frozen=True)
class WeightRecipe:
    """How an initializer's values are made: the state tensor, in the graph's dtype, maybe transposed."""

    state_name: str
    transposed: bool = False
    dtype: torch.dtype | None = None  # None: the graph's dtype


def ir_tensor(tensor: Tensor, name: str):
    """An onnx_ir tensor over a CPU tensor's bytes (bfloat16 included, through ml_dtypes)."""
    import ml_dtypes
    import onnx_ir as ir

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        return ir.Tensor(tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(tensor.numpy(), name=name)


def read_weight(weights: ModelWeights, recipe: WeightRecipe, dtype: torch.dtype) -> Tensor:
    # float() first, as a checkpoint loaded into the float32 model would be, so that a bf16 checkpoint
    # exported to fp16 rounds exactly as it does from the model in memory
    tensor = weights.tensors[recipe.state_name].detach().to("cpu").float().to(recipe.dtype or dtype)
    return tensor.T.contiguous() if recipe.transposed else tensor


def lazy_value(weights: ModelWeights, recipe: WeightRecipe, dtype: torch.dtype, name: str):
    import onnx_ir as ir

    shape = shape_of(weights.tensors, recipe.state_name)
    shape = tuple(reversed(shape)) if recipe.transposed else shape
    return ir.LazyTensor(lambda: ir_tensor(read_weight(weights, recipe, dtype), name),
                         dtype=_ir_dtype(recipe.dtype or dtype), shape=ir.Shape(shape), name=name)


def _ir_dtype(dtype: torch.dtype):
    import onnx_ir as ir

    return {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
            torch.bfloat16: ir.DataType.BFLOAT16}[dtype]


class UnboundInitializer(ValueError):
    """The traced graph has an initializer that is not one of the model's weights."""


def bind_weights(model, weights: ModelWeights, row: Precision,
                 aliases: dict[str, WeightRecipe] | None = None) -> dict[str, WeightRecipe]:
    """Give every initializer of the traced `model` (an onnx_ir Model) a lazy value; return each
    weight initializer's recipe. `aliases`: initializers of the traced wrapper that copy a weight
    (the static-cache graph's float32 logits head). The rotary frequencies are computed, as the model does."""
    recipes: dict[str, WeightRecipe] = {}
    for name, value in model.graph.initializers.items():
        if aliases and name in aliases:
            recipes[name] = value.meta[RECIPE] = aliases[name]
            value.const_value = lazy_value(weights, recipes[name], row.torch_dtype, name)
            continue
        state_name = name.removeprefix(MODULE_PREFIX)
        if state_name == "inv_freq":
            frequencies = inverse_frequencies(weights.config.dim_head, weights.config.theta)
            value.const_value = ir_tensor(frequencies, name)
            continue
        if state_name not in weights.tensors:
            raise UnboundInitializer(f"the traced graph has an initializer {name!r} that is not a weight of the model")
        recipes[name] = value.meta[RECIPE] = WeightRecipe(state_name)
        value.const_value = lazy_value(weights, recipes[name], row.torch_dtype, name)
    return recipes


def fold_weight_transposes(model, weights: ModelWeights, recipes: dict[str, WeightRecipe],
                           row: Precision) -> dict[str, WeightRecipe]:
    """Replace Transpose(weight) by a lazily transposed initializer named `<weight>.T`; drop the
    weight when nothing else reads it. Returns the recipes of the graph's initializers after."""
    import onnx_ir as ir

    graph = model.graph
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.domain == "" and node.inputs else None
        if source is None or source.name not in recipes or len(source.shape or ()) != 2:
            continue
        perm = node.attributes.get("perm")
        if perm is not None and list(perm.as_ints()) != [1, 0]:
            continue
        name = f"{source.name}.T"
        recipe = WeightRecipe(recipes[source.name].state_name, True, recipes[source.name].dtype)
        if name not in graph.initializers:
            value = ir.Value(name=name, shape=ir.Shape(tuple(reversed(tuple(source.shape)))), type=source.type,
                             const_value=lazy_value(weights, recipe, row.torch_dtype, name))
            value.meta[RECIPE] = recipe
            graph.register_initializer(value)
            recipes[name] = recipe
        node.outputs[0].replace_all_uses_with(graph.initializers[name])
        graph.remove(node, safe=True)
        if not source.uses() and not source.is_graph_output():
            del graph.initializers[source.name]
            recipes.pop(source.name)
    return recipes


def materialize_small(model, limit_bytes: int) -> None:
    """Read the initializers of at most `limit_bytes` now, so the optimizer can fold them as it
    would fold weights in memory (norm scales cast to float32, for one)."""
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.LazyTensor) and tensor.nbytes <= limit_bytes:
            value.const_value = ir.Tensor(tensor.numpy(), name=value.name)
