"""evaluate step: IW bound, figures and probes of one trained model -> evaluation directory.

The evaluation settings are those of the model's resolved config.yaml (so a smoke model is
evaluated with the smoke overlay's eval section). The bound goes to a Metrics artifact, which
Vertex AI shows next to the step.
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
    from vnca.evaluate import evaluate as run_evaluation

    result = run_evaluation(
        model_dir=model.path, data_dir=data.path, out_dir=evaluation.path, overrides=[]
    )
    iw = result["iwelbo"]
    metrics.log_metric("iwelbo_nats", float(iw["mean_nats"]))
    metrics.log_metric("iwelbo_stderr_nats", float(iw["stderr_nats"]))
    metrics.log_metric("bits_per_dim", float(iw["bits_per_dim"]))
    if "reconstruction" in result:
        metrics.log_metric("reconstruction_accuracy", float(result["reconstruction"]["accuracy"]))
