"""Models: encoder, NCA decoders, baseline decoder and the VAE that combines them."""

from vnca.models.vae import VAE, build_model, count_params

__all__ = ["VAE", "build_model", "count_params"]
