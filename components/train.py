"""train step: one variant, configured by the YAML text of its config, -> a Model artifact.

The config travels as a pipeline parameter (YAML text), so a submission can override it.

Outputs: `model` (the run directory: parameters, checkpoints, metrics.jsonl, summary.json and
the TensorBoard event files, `vnca.tensorboard`) and `metrics` (Metrics, shown next to the
step on Vertex AI): `final_loss` (the last step's loss), `final_kl` and `final_elbo` (means over
the last logged interval, metrics.jsonl's last training record), `val_elbo` (the last
validation bound, when the run validates), `steps` and `wall_time_s`. They are read back
through their contracts (`vnca.contracts.TrainSummary`, `read_train_log`); a value that is null
or not finite is not logged (a Metrics value must be a number).
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Model, Output

from vnca_pipeline.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train(config: str, data: Input[Dataset], model: Output[Model], metrics: Output[Metrics]):
    """Train the variant described by `config` (YAML text) on `data`; write it to `model`."""
    import math
    import os

    from vnca import artifacts, contracts
    from vnca import config as vnca_config
    from vnca.train import train_and_evaluate

    cfg = vnca_config.loads(config, source="the train step's config parameter")
    train_and_evaluate(cfg, data_dir=data.path, out_dir=model.path)
    summary = contracts.TrainSummary.read(os.path.join(model.path, artifacts.TRAIN_SUMMARY))
    log = contracts.read_train_log(os.path.join(model.path, artifacts.TRAIN_METRICS))
    last = next((r for r in reversed(log) if isinstance(r, contracts.TrainRecord)), None)
    valid = next((r for r in reversed(log) if isinstance(r, contracts.ValidRecord)), None)
    model.metadata.update(name=summary.name, variant=summary.variant, steps=summary.steps)
    values = {"final_loss": summary.final_loss,
              "final_kl": last.kl if last else None,
              "final_elbo": last.elbo if last else None,
              "val_elbo": valid.val_elbo if valid else None,
              "steps": summary.steps, "wall_time_s": summary.wall_time_s}
    for key, value in values.items():
        if value is not None and math.isfinite(value):
            metrics.log_metric(key, float(value))
