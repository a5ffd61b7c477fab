"""Published numbers: importance-weighted bound (K = 128, binarized MNIST test set, nats).

Paper: Palm et al., ICLR 2022. Reproduction: Aillet & Sondén, ReScience C 9(2) #31.
The paper reports no likelihood for the baseline.
"""

PAPER_NATS = {"baseline": None, "doubling": -84.23, "nondoubling": -90.97}
REPRODUCTION_NATS = {"baseline": -84.64, "doubling": -84.15, "nondoubling": -89.3}
MNIST_PIXELS = 28 * 28  # bits/dim are per real pixel, as O does for MNIST
