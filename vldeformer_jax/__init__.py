"""VLDeformer in JAX/Flax: a pre-trained VL-BERT decomposed into an individual encoder."""

from vldeformer_jax.config import ModelConfig
from vldeformer_jax.encoder import VLDeformer, load_pretrained

__all__ = ["ModelConfig", "VLDeformer", "load_pretrained"]
__version__ = "0.1.0"
