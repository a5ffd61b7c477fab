"""Models: encoder, NCA decoders, baseline decoder and the VAE that combines them.

Their layers (`layers`, flax modules with PyTorch's initialisation) compute through `kernels`
(the conv algorithms and the precision policy).
"""

from vnca.models.vae import VAE, build_model, count_params

__all__ = ["VAE", "build_model", "count_params"]
