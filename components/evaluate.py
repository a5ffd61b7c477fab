"""evaluate step: IW bound, figures and probes of one trained model -> evaluation directory.

The evaluation settings are those of the model's resolved config.yaml (so a smoke model is
evaluated with the smoke overlay's eval section). The headline numbers go to a Metrics
artifact, which Vertex AI shows next to the step: `iwelbo_nats`, `iwelbo_stderr_nats`,
`bits_per_dim` and `reconstruction_accuracy`, read back from metrics.json through its contract
(`vnca.contracts.EvalMetrics`). A value that is null there is not logged (a Metrics value must
be a number): the standard error of a bound over one image (`eval.n_images: 1`), the
reconstruction accuracy when no image was classified (`eval.classify_images: 0`, no section).
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from vnca_pipeline.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    data: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
):
    """Evaluate `model` on the test split of `data`; write metrics.json and figures."""
    import os

    from vnca import artifacts, contracts
    from vnca.evaluate import evaluate as run_evaluation

    run_evaluation(model_dir=model.path, data_dir=data.path, out_dir=evaluation.path,
                   overrides=[])
    m = contracts.EvalMetrics.read(os.path.join(evaluation.path, artifacts.EVAL_METRICS))
    values = {"iwelbo_nats": m.iwelbo.mean_nats, "iwelbo_stderr_nats": m.iwelbo.stderr_nats,
              "bits_per_dim": m.iwelbo.bits_per_dim,
              "reconstruction_accuracy": m.reconstruction.accuracy if m.reconstruction else None}
    for key, value in values.items():
        if value is not None:  # the contract's numbers are finite; null is skipped
            metrics.log_metric(key, float(value))
