"""The merge core: materializes recipes in place, into the parameters of one live model.

:class:`MergeEngine` (:mod:`~evomerge.engine.engine`) coordinates plan -> merge -> verify and export over its
parts: :mod:`~evomerge.engine.device` (which device, how much memory), :mod:`~evomerge.engine.layout` (flat
buffers, binding into the live model), :mod:`~evomerge.engine.inputs` (what is kept across candidates, within
memory budgets) and :mod:`~evomerge.engine.kernels` (compiled / eager / chunked entrywise merges). Beside it:
:mod:`~evomerge.engine.streaming` (a merge written tensor by tensor) and :mod:`~evomerge.engine.stacking` (layer
stacks, which change the layer count).
"""

from evomerge.engine.device import compute_device
from evomerge.engine.engine import DTYPES, MergeEngine, MergeError, MergeStats
from evomerge.engine.inputs import tensor_seed
from evomerge.engine.layout import load_model, model_class

__all__ = ["DTYPES", "MergeEngine", "MergeError", "MergeStats", "compute_device", "load_model", "model_class",
           "tensor_seed"]
