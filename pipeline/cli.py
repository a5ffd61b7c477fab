"""The `vnca` console script: the library's subcommands (vnca.cli) plus the pipeline's.

`compile`, `run-local`, `plan` and `submit` are added here to the parser `vnca.cli` builds, so
`vnca --help` lists every subcommand while the library (src/vnca) never imports the pipeline.
Each handler imports what it runs lazily: `vnca report --help` imports neither JAX nor kfp, and
without kfp (the `pipeline` extra) compile, run-local and submit stop with one line saying how
to install it (exit 2). `plan` needs no kfp.
"""

from __future__ import annotations

import argparse
import sys

from vnca import cli
from vnca.cli import DefaultsFormatter
from vnca.config import TIERS
from vnca.errors import UserError


def _require_kfp() -> None:
    try:
        import kfp  # noqa: F401
    except ImportError:
        raise UserError(
            "this command needs kfp, which the pipeline extra installs: "
            "pip install 'vnca[pipeline]'"
        ) from None


def cmd_compile(args: argparse.Namespace) -> int:
    _require_kfp()
    from vnca_pipeline.compile import compile_pipeline

    path = compile_pipeline(
        output=args.output, target=args.target, image=args.image, configs=args.config
    )
    print(f"compiled pipeline written to {path}")
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    _require_kfp()
    from vnca_pipeline.local import run_local

    tier = "smoke" if args.smoke else "paper" if args.full else args.tier
    report = run_local(
        configs=args.config, root=args.root, runner=args.runner, tier=tier,
        data_source=args.data_source, raw_dir=args.raw_dir, image=args.image,
        overrides=args.overrides, verbose=args.verbose, cache=not args.no_cache,
    )
    print(f"\npipeline finished; report: {report}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vnca import plan
    from vnca_pipeline.variants import load_variants

    if not 0 < args.utilisation <= 1:
        raise UserError(f"--utilisation must be in (0, 1], got {args.utilisation}")
    variants = load_variants(args.config or None, args.tier, args.overrides)
    plans = [plan.make_plan(v.config, args.target, args.utilisation) for v in variants]
    print(plan.format_plans(plans))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    _require_kfp()
    from vnca_pipeline.submit import submit

    submit(
        project=args.project, region=args.region, pipeline_root=args.pipeline_root,
        service_account=args.service_account, target=args.target, image=args.image,
        configs=args.config, dry_run=args.dry_run, tier="smoke" if args.smoke else "paper",
        overrides=args.overrides, tensorboard=args.tensorboard, experiment=args.experiment,
        cache=not args.no_cache,
    )
    return 0


def add_pipeline_commands(sub: argparse._SubParsersAction) -> None:
    """Add compile, run-local, plan and submit to the subparsers of vnca.cli's parser."""
    p = sub.add_parser("compile", help="compile the Kubeflow pipeline to YAML",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--output", default="pipeline.yaml", help="output file")
    p.add_argument("--target", choices=["local", "vertex-tpu", "vertex-gpu"], default="vertex-tpu",
                   help="where the pipeline runs: train and evaluate as TPU or GPU custom jobs, "
                   "or plain local steps")
    p.add_argument("--image", help="container image for every step (default: the target's "
                   "image in components/images.py; images/build.sh passes the tag it pushed)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="variant configs baked in as defaults: the three variants, or any one "
                   "(default: the three paper configs)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run-local", help="run the whole pipeline locally with kfp.local",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="variant configs, the three variants or any one; each gets its tier's "
                   "overlay (default: configs/baseline.yaml, doubling.yaml and nondoubling.yaml)")
    p.add_argument("--root", default="runs/local",
                   help="local pipeline root directory (runs, logs, the compilation cache)")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="run each step as a subprocess of this Python or in the image")
    p.add_argument("--tier", choices=TIERS, default="demo",
                   help="run size: demo (minutes, visibly learns), cpu (full data, about an "
                   "hour), smoke (seconds, for tests), paper (the paper's configs)")
    p.add_argument("--smoke", action="store_true", help="the same as --tier smoke")
    p.add_argument("--full", action="store_true", help="the same as --tier paper")
    p.add_argument("--verbose", action="store_true",
                   help="also print everything kfp and the steps log (always in run.log)")
    p.add_argument("--data-source", choices=["bundled", "raw", "tfds"], default="bundled",
                   help="the bundled sample (2,000/500/1,000 images), the raw files in "
                   "--raw-dir (50,000/10,000/10,000) or TensorFlow Datasets")
    p.add_argument("--raw-dir", help="with --data-source raw: directory of the raw files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every variant, e.g. --set train.steps=5")
    p.add_argument("--image", help="with --runner docker: image for every step "
                   "(default: the CPU image named in components/images.py)")
    p.add_argument("--no-cache", action="store_true",
                   help="reuse nothing from earlier runs: no compiled programs from ROOT/"
                   ".jax-cache either (step outputs are never reused locally)")
    p.set_defaults(func=cmd_run_local)

    p = sub.add_parser("plan", help="what each variant's run will cost: FLOPs, memory, "
                       "wall time and chip-hours on its machine", formatter_class=DefaultsFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="variant configs (default: the three paper configs)")
    p.add_argument("--tier", choices=TIERS, default="paper",
                   help="the tier's overlay goes on each config, as in run-local")
    p.add_argument("--target", choices=["vertex-tpu", "vertex-gpu"], default="vertex-tpu",
                   help="the config's TPU slice or GPU machine")
    p.add_argument("--utilisation", type=float, default=0.3,
                   help="assumed share of the chips' peak matrix throughput")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every variant")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("submit", help="compile and submit the pipeline to Vertex AI",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--project", help="Google Cloud project id")
    p.add_argument("--region", default="us-central1", help="Vertex AI region")
    p.add_argument("--pipeline-root", required=True, help="gs://BUCKET/PATH for artifacts")
    p.add_argument("--service-account",
                   help="service account the pipeline and its custom jobs run as")
    p.add_argument("--target", choices=["vertex-tpu", "vertex-gpu"], default="vertex-tpu",
                   help="train and evaluate on the TPU slice or the GPU machine of each config")
    p.add_argument("--image", help="container image for every step (default: the target's "
                   "image in components/images.py)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="variant configs: the three variants, or any one "
                   "(default: the three paper configs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every variant (the job's config_* parameters)")
    p.add_argument("--smoke", action="store_true",
                   help="layer configs/smoke.yaml on the configs and use the bundled data sample "
                   "(a cheap end-to-end check of the Vertex AI setup)")
    p.add_argument("--tensorboard", metavar="RESOURCE",
                   help="stream each train step's TensorBoard logs to this Vertex AI TensorBoard "
                   "(projects/P/locations/REGION/tensorboards/ID, in --region)")
    p.add_argument("--experiment", metavar="NAME",
                   help="add the run to this Vertex AI experiment (created if missing)")
    p.add_argument("--no-cache", action="store_true",
                   help="run every step, even prepare-data, whose outputs Vertex AI would "
                   "otherwise reuse from an earlier run with the same inputs")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job's parameters and machine specs; contact nothing")
    p.set_defaults(func=cmd_submit)


def build_parser() -> argparse.ArgumentParser:
    return cli.build_parser(add_pipeline_commands)


def main(argv: list[str] | None = None) -> int:
    return cli.main(argv, build_parser())


if __name__ == "__main__":
    sys.exit(main())
