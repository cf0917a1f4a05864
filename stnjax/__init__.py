"""stnjax: the Saliency Transformation Network (RSTN) in JAX/Flax."""

__version__ = "0.1.0"
