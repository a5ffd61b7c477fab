"""report step: one report over every variant's evaluation and training run.

A KFP component has a fixed signature, and KFP v2 hands a list of artifacts to a step only from
a `dsl.ParallelFor` fan-out, so each variant's evaluation and model are inputs of their own:
`report` takes the three variants of the pipeline, `report_one_variant` the one variant of a
pipeline compiled from one config (pipeline/pipeline.py). A new variant is a new pair of
inputs here and a new line in the pipeline.

Outputs: `report_dir` (report.html, report.md and its figures, as `vnca report` writes them),
`report_html` (a copy of the self-contained report.html as an HTML artifact, which the Vertex AI
console renders), `report_md` (report.md as a Markdown artifact, which the console renders too:
its text and tables; the console shows that one file, so each figure link, relative to
report_dir, becomes a note that the figure is in report_html) and `bounds` (Metrics: every
variant's IW bound, shown together in the console; they are also on each evaluate step, but
GCPC's custom-job wrapper, which runs evaluation on Vertex AI, is known to drop output-artifact
metadata: kubeflow/pipelines#7234). The bounds are read through `vnca.contracts.EvalMetrics`.
"""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from vnca_pipeline.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report(
    data: Input[Dataset],
    eval_baseline: Input[Artifact],
    model_baseline: Input[Model],
    eval_doubling: Input[Artifact],
    model_doubling: Input[Model],
    eval_nondoubling: Input[Artifact],
    model_nondoubling: Input[Model],
    report_dir: Output[Artifact],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    bounds: Output[Metrics],
):
    """Build report.html / report.md over the variants baseline, doubling, nondoubling."""
    import os
    import re
    import shutil
    from pathlib import Path

    from vnca import artifacts, contracts
    from vnca.report import build_report

    evals = {"baseline": eval_baseline.path, "doubling": eval_doubling.path, "nondoubling": eval_nondoubling.path}
    models = [model_baseline.path, model_doubling.path, model_nondoubling.path]
    html = build_report(eval_dirs=list(evals.values()), train_dirs=models, data_dir=data.path,
                        out_dir=report_dir.path)
    shutil.copyfile(html, report_html.path)
    md = Path(report_dir.path, artifacts.REPORT_MD).read_text(encoding="utf-8")
    Path(report_md.path).write_text(re.sub(r"!\[[^\]]*\]\((figures/[^)]*)\)",
                                           r"*(in report_html; report_dir/\1)*", md),
                                    encoding="utf-8")
    for name, eval_dir in evals.items():
        metrics = contracts.EvalMetrics.read(os.path.join(eval_dir, artifacts.EVAL_METRICS))
        bounds.log_metric(f"{name}_iwelbo_nats", metrics.iwelbo.mean_nats)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def report_one_variant(
    data: Input[Dataset],
    evaluation: Input[Artifact],
    model: Input[Model],
    report_dir: Output[Artifact],
    report_html: Output[HTML],
    report_md: Output[Markdown],
    bounds: Output[Metrics],
):
    """Build report.html / report.md over one variant."""
    import os
    import re
    import shutil
    from pathlib import Path

    from vnca import artifacts, contracts
    from vnca.report import build_report

    html = build_report(eval_dirs=[evaluation.path], train_dirs=[model.path], data_dir=data.path,
                        out_dir=report_dir.path)
    shutil.copyfile(html, report_html.path)
    md = Path(report_dir.path, artifacts.REPORT_MD).read_text(encoding="utf-8")
    Path(report_md.path).write_text(re.sub(r"!\[[^\]]*\]\((figures/[^)]*)\)",
                                           r"*(in report_html; report_dir/\1)*", md),
                                    encoding="utf-8")
    metrics = contracts.EvalMetrics.read(os.path.join(evaluation.path, artifacts.EVAL_METRICS))
    bounds.log_metric(f"{metrics.name}_iwelbo_nats", metrics.iwelbo.mean_nats)
