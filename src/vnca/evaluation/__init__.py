"""Pieces of the evaluation step; `vnca.evaluate.evaluate` runs them on a model directory.

bound.py    importance-weighted bound L_K, batched, one key per test image
damage.py   damage recovery of the non-doubling VNCA as a log-likelihood curve
probe.py    linear probe on the non-doubling VNCA's final cell states, split by image
latent.py   encoder means, t-SNE, interpolations, samples, reconstructions, growth stages
figures.py  PNG figures (Agg)
"""
