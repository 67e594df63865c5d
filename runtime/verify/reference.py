"""Which PyTorch model a deployed graph is compared with, and under which tolerance row: decided
from the graph's metadata alone, so `export-model --verify`, `check-parity` and the GPU script
judge a graph the same way."""
from __future__ import annotations

from dataclasses import dataclass

from export.quantize import fake_quantize
from export.static_cache_graph import static_row_orders
from models.errors import ToolkitError
from models.graph_metadata import STATIC_CACHE, GraphMetadata
from models.precision import Precision, precision
from models.transformer import Transformer

AGAINST = {
    "quantized": "the weights the graph holds: for a quantized graph the PyTorch model with the same "
                 "fake-quantized weights, judged by its activation precision's row (tight)",
    "float": "the unquantized float PyTorch model, judged by the quantized row against float "
             "(cosine, top-1, teacher-forced top-1)",
}


@dataclass(frozen=True)
class ParityReference:
    model: Transformer  # float32
    row: Precision  # whose tolerance applies
    label: str  # what the model is, for reports


def parity_reference(model: Transformer, metadata: GraphMetadata, against: str = "quantized") -> ParityReference:
    """The model to compare a graph with: `model` (the float weights the graph was exported from)
    itself, or with the graph's quantization applied as the graph computes it."""
    if against not in AGAINST:
        raise ToolkitError(f"unknown reference {against!r}; choose one of {', '.join(AGAINST)}")
    row, record = precision(metadata.precision), metadata.quantization
    if record is None or against == "float":
        return ParityReference(model, row, "float weights")
    orders = static_row_orders(model) if metadata.kind == STATIC_CACHE else None
    fake = fake_quantize(model, record, row.torch_dtype, orders)
    return ParityReference(fake, row.float_row, f"the same {record.describe()} weights, fake-quantized")
