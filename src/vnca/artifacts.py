"""File names inside the artifacts that the pipeline's steps pass to one another.

One place for the layout of each artifact directory, so that writers and readers agree.
"""

# prepare-data -> DATA_DIR
DATASET = "dataset.npz"            # {split}_x uint8 (N, 28, 28) in {0, 1}; {split}_y; {split}_mnist_index
MATCH_REPORT = "match_report.json"
MATCHED_PAIRS_PNG = "matched_pairs.png"
DIGIT_CLASSIFIER = "digit_classifier.npz"  # vnca.evaluation.classifier weights (no pickle)
SPLITS = ("train", "valid", "test")

# train -> MODEL_DIR
RESOLVED_CONFIG = "config.yaml"    # written before step 0
PARAMS = "params.msgpack"          # final parameters (flax.serialization), written last
CHECKPOINTS = "ckpt"               # orbax CheckpointManager directory (resume state)
TRAIN_METRICS = "metrics.jsonl"    # one JSON object per logged step
TRAIN_SUMMARY = "summary.json"     # variant, steps, wall time, hardware, parameter count

# evaluate -> EVAL_DIR
EVAL_METRICS = "metrics.json"
EVAL_ARRAYS = "arrays.npz"         # arrays a report can re-plot
# figure file -> caption; the evaluate step writes those that apply to the variant
EVAL_FIGURES = {
    "samples.png": "Prior samples (Bernoulli probabilities)",
    "samples_binary.png": "Prior samples (Bernoulli draws)",
    "reconstructions.png": "Test images (odd columns) and reconstructions (even columns)",
    "growth.png": "Growth stages from the seed to the final image",
    "damage_recovery.png": "Damage recovery: before, just after damage, after regrowth",
    "damage_curve.png": "Log-likelihood of the test reconstruction over NCA steps around damage",
    "tsne.png": "t-SNE of encoder means, coloured by matched label",
    "probe.png": "Linear probe on cell states: image, per-cell class, per-cell confidence",
    "interpolations.png": "Latent interpolation between pairs of test digits",
}

# report -> REPORT_DIR
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
