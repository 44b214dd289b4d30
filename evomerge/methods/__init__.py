"""Merge methods: pure per-tensor functions, one module per family, and a registry of them.

Calling convention (every method): ``fn(base, sources, *, <params>, <inputs>) -> Tensor`` with ``sources``
[N, *S] float32, ``base`` [*S] or None, per-source parameters as float32 tensors [N], global parameters as python
scalars; the result is a new float32 tensor [*S] on the inputs' device. ``<inputs>``: what the method declares in
``MergeMethod.inputs`` (registry), made beforehand by the engine; without them a method computes them itself, from
``seed`` (the tensor's seed: stochastic methods draw from it, :mod:`evomerge.methods.counter_rng`) and ``stats``
(data statistics) where it declares those (``MergeMethod.whole_tensor_inputs``).
"""

from evomerge.methods.registry import METHODS, get_method
from evomerge.methods.select import magnitude_threshold
from evomerge.methods.spec import MergeMethod, MethodError, Param, validate_params

__all__ = ["METHODS", "MergeMethod", "MethodError", "Param", "get_method", "magnitude_threshold", "validate_params"]
