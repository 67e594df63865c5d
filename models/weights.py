"""A model's weights without the model: its config and its tensors by state_dict name, each read
only when asked for. A checkpoint opened this way costs no memory until a tensor is read, which is
what lets an export stream a model larger than this machine's memory into a graph."""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import ToolkitError


class NonFiniteWeights(ToolkitError):
    """A checkpoint tensor holds NaN or infinite values."""


FINITE_CHUNK = 1 << 20  # elements checked at a time: a 1 MiB mask, whatever the tensor's size


def all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite, in chunks (a whole-tensor mask or float64 copy would cost
    memory the size of the tensor, which a streamed export of a large model does not have)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(FINITE_CHUNK))


class LazyTensors(Mapping):
    """Tensors by name, each made by its reader when asked (nothing is cached); shapes and dtypes
    are known without reading."""

    def __init__(self, readers: Mapping[str, Callable[[], Tensor]], shapes: Mapping[str, tuple[int, ...]],
                 dtypes: Mapping[str, torch.dtype]):
        self._readers, self.shapes, self.dtypes = dict(readers), dict(shapes), dict(dtypes)

    def __getitem__(self, name: str) -> Tensor:
        tensor = self._readers[name]()
        if tensor.is_floating_point() and not all_finite(tensor):
            raise NonFiniteWeights(f"the weights' tensor {name} holds NaN or infinite values (did training diverge?); "
                                   "use a checkpoint whose weights are finite")
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._readers)

    def __len__(self) -> int:
        return len(self._readers)


def shape_of(tensors: Mapping[str, Tensor], name: str) -> tuple[int, ...]:
    """A tensor's shape, read from a lazy mapping's header when it has one."""
    shapes = getattr(tensors, "shapes", None)
    return tuple(shapes[name]) if shapes is not None else tuple(tensors[name].shape)


def dtype_of(tensors: Mapping[str, Tensor], name: str) -> torch.dtype:
    dtypes = getattr(tensors, "dtypes", None)
    return dtypes[name] if dtypes is not None else tensors[name].dtype


@dataclass(frozen=True)
class ModelWeights:
    """`config` and the model's tensors by state_dict name (this project's layout)."""

    config: ModelConfig
    tensors: Mapping[str, Tensor]

    @classmethod
    def of(cls, model) -> "ModelWeights":
        """The weights of a model in memory (its own tensors, not copies)."""
        return cls(model.config, {name: t.detach() for name, t in model.state_dict().items()})

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes the weights take, in `dtype` if given, else as stored."""
        total = 0
        for name in self.tensors:
            count = 1
            for size in shape_of(self.tensors, name):
                count *= size
            total += count * (dtype or dtype_of(self.tensors, name)).itemsize
        return total

    def largest_tensor_bytes(self, dtype: torch.dtype = torch.float32) -> int:
        return max(torch.Size(shape_of(self.tensors, name)).numel() * dtype.itemsize for name in self.tensors)

    def truncated(self, layers: int) -> "ModelWeights":
        """The first `layers` blocks with the embedding, final norm and logits head: a smaller model
        over the same tensors (read from the same place, on access)."""
        keep = [name for name in self.tensors
                if not name.startswith("layers.") or int(name.split(".")[1]) < layers]
        tensors = LazyTensors({name: (lambda name=name: self.tensors[name]) for name in keep},
                              {name: shape_of(self.tensors, name) for name in keep},
                              {name: dtype_of(self.tensors, name) for name in keep})
        return ModelWeights(self.config.replace(depth=layers), tensors)

    def parameter_count(self) -> int:
        return sum(torch.Size(shape_of(self.tensors, name)).numel() for name in self.tensors)

    def build(self):
        """The Transformer with these weights in float32, in eval mode (reads every tensor)."""
        from .transformer import Transformer

        from .rotary import inverse_frequencies

        with torch.device("meta"):
            model = Transformer(self.config)
        # assign=True: the tensors read become the parameters (no second copy, no random init first)
        model.load_state_dict({name: self.tensors[name].float() for name in self.tensors}, assign=True)
        model.inv_freq = inverse_frequencies(self.config.dim_head, self.config.theta)
        return model.eval()
