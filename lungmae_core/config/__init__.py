"""Typed, validated configuration: frozen dataclasses built from YAML or flat kebab-case mappings.

Every configuration in LungMAE-FL (model, preprocessing, training, ``site.yaml``, ``federation.yaml``) is a
frozen dataclass of plain values that checks itself in ``__post_init__``. The package is split by what is
configured, and this module is its one public face (import from ``lungmae_core.config``):

- ``loader``: the generic part, a mapping (from YAML, from Flower's ``run_config`` or from the command line)
  into such a dataclass, every error naming the file, the key and what was allowed (:func:`from_mapping`,
  :func:`to_mapping`, :func:`load_yaml`, :func:`check`);
- ``model``: :class:`ModelConfig`, the named architectures and :func:`model_config`;
- ``train``: :class:`TrainConfig`, one local training phase;
- ``preprocess``: :class:`PreprocessConfig`, the preprocessing of one CT volume, shared by
  :mod:`lungmae_core.preprocess` and :mod:`lungmae_core.lungmask`.
"""

from lungmae_core.config.loader import check, from_mapping, load_yaml, norm_key, to_mapping
from lungmae_core.config.model import (
    INPUT_HU_MAX,
    INPUT_HU_MIN,
    MODEL_CONFIGS,
    TINY_INPUT_WINDOWS,
    ModelConfig,
    model_config,
)
from lungmae_core.config.preprocess import PREPROCESS_VERSION, PreprocessConfig
from lungmae_core.config.train import TrainConfig

__all__ = [
    "INPUT_HU_MAX",
    "INPUT_HU_MIN",
    "MODEL_CONFIGS",
    "PREPROCESS_VERSION",
    "TINY_INPUT_WINDOWS",
    "ModelConfig",
    "PreprocessConfig",
    "TrainConfig",
    "check",
    "from_mapping",
    "load_yaml",
    "model_config",
    "norm_key",
    "to_mapping",
]
