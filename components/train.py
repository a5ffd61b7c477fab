"""train step: one variant, configured by the YAML text of its config, -> a Model artifact.

The config travels as a pipeline parameter (YAML text), so a submission can override it.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from vnca_pipeline.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def train(config: str, data: Input[Dataset], model: Output[Model]):
    """Train the variant described by `config` (YAML text) on `data`; write it to `model`."""
    from vnca import config as vnca_config
    from vnca.train import train_and_evaluate

    cfg = vnca_config.loads(config, source="the train step's config parameter")
    summary = train_and_evaluate(cfg, data_dir=data.path, out_dir=model.path)
    model.metadata.update(name=cfg.name, variant=cfg.model.variant, steps=int(summary["steps"]))
