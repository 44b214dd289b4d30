"""The offline tiny model zoo: synthetic tasks, a tokenizer, a base model, experts and a soup sweep.

``build_zoo(dir, ZooConfig.full())`` trains everything locally and deterministically;
``cached_zoo(ZooConfig.mini())`` builds once into a cache and is what tests use.
"""

from evomerge.zoo.build import build_zoo, cached_zoo, default_cache_root
from evomerge.zoo.config import ModelShape, TrainSpec, ZooConfig
from evomerge.zoo.manifest import Zoo

__all__ = ["ModelShape", "TrainSpec", "Zoo", "ZooConfig", "build_zoo", "cached_zoo", "default_cache_root"]
