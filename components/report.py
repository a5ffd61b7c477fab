"""report step: one report over every variant's evaluation and training run.

A KFP component has a fixed signature, and KFP v2 can only hand a list of artifacts to a step
from a `dsl.ParallelFor` fan-out, so the report component is generated for the variants a
pipeline is compiled with: `report_component(["baseline", "doubling"])` is a lightweight
component with inputs `data`, `eval_baseline`, `model_baseline`, `eval_doubling`,
`model_doubling`. Its source (below, with the input list filled in) is what the compiled YAML
embeds, like any other lightweight component's.

Outputs: `report_dir` (report.html, report.md and its figures, as `vnca report` writes them),
`report_html` (a copy of the self-contained report.html as an HTML artifact, which the Vertex AI
console renders) and `bounds` (Metrics: every variant's IW bound, shown together in the
console; they are also on each evaluate step, but GCPC's custom-job wrapper, which runs
evaluation on Vertex AI, is known to drop output-artifact metadata: kubeflow/pipelines#7234).
"""

import keyword
import linecache
import re

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from components.images import component
from vnca.errors import ConfigError

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

_SOURCE = '''\
def report(
    data: Input[Dataset],
{inputs}
    report_dir: Output[Artifact],
    report_html: Output[HTML],
    bounds: Output[Metrics],
):
    """Build report.html / report.md over the variants {names}."""
    import os
    import shutil

    from vnca import artifacts, contracts
    from vnca.report import build_report

    evals = {{{evals}}}
    models = [{models}]
    html = build_report(eval_dirs=list(evals.values()), train_dirs=models, data_dir=data.path,
                        out_dir=report_dir.path)
    shutil.copyfile(html, report_html.path)
    for name, eval_dir in evals.items():
        metrics = contracts.EvalMetrics.read(os.path.join(eval_dir, artifacts.EVAL_METRICS))
        bounds.log_metric(f"{{name}}_iwelbo_nats", metrics.iwelbo.mean_nats)
'''


def check_variant_names(names: list[str]) -> None:
    """Variant names become input names: lower-case identifiers, each used once."""
    for name in names:
        if not _NAME.match(name) or keyword.iskeyword(name):
            raise ConfigError(
                f"config name {name!r} cannot name a pipeline variant: use lower-case letters, "
                "digits and underscores, starting with a letter"
            )
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"the pipeline needs distinct config names, got {names}")


def report_function(names: list[str]):
    """The report step's Python function for variants `names` (source kept for KFP)."""
    check_variant_names(names)
    source = _SOURCE.format(
        inputs="\n".join(
            f"    eval_{n}: Input[Artifact],\n    model_{n}: Input[Model]," for n in names
        ),
        names=", ".join(names),
        evals=", ".join(f'"{n}": eval_{n}.path' for n in names),
        models=", ".join(f"model_{n}.path" for n in names),
    )
    filename = f"<vnca report component: {', '.join(names)}>"
    # inspect.getsource (which KFP uses to embed the body) finds generated code in linecache.
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace = {
        "__name__": "vnca_report_component", "Input": Input, "Output": Output,
        "Artifact": Artifact, "Dataset": Dataset, "Model": Model, "HTML": HTML, "Metrics": Metrics,
    }
    exec(compile(source, filename, "exec"), namespace)  # noqa: S102 - our own template
    return namespace["report"]


def report_component(names: list[str], image: str | None = None):
    """The report step as a lightweight component for variants `names`."""
    return component(report_function(names), image)
