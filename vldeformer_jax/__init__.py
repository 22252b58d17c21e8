"""VLDeformer in JAX/Flax: a pre-trained VL-BERT decomposed into an individual encoder.

The public names are imported lazily, so `import vldeformer_jax.data.readers` (e.g. in
a tf.data worker) does not pay for importing JAX and Flax.
"""

import importlib

__all__ = ["ModelConfig", "VLDeformer", "load_pretrained"]
__version__ = "0.1.0"

_LAZY = {"ModelConfig": "vldeformer_jax.config", "VLDeformer": "vldeformer_jax.encoder",
         "load_pretrained": "vldeformer_jax.encoder"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'vldeformer_jax' has no attribute {name!r}")
