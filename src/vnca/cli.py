"""`vnca` command line: parse arguments, call one library function, print where results are.

Every subcommand is thin: library code lives in the modules it imports (lazily, so `vnca
report --help` never imports JAX). A `UserError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from vnca.errors import UserError, environment_problem, quiet_closed_event_loops

PROG = "vnca"


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends every option's text with its default (flags: off)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.default is argparse.SUPPRESS or action.required
                or not action.option_strings):
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)" if text else "(default: off)"
        if action.default is None or action.default == []:
            return f"{text} (default: none)" if text else "(default: none)"
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _add_config_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument(
        "--config", action="append", default=[], required=required, metavar="YAML",
        help="config file; repeat to layer files (later ones win), e.g. "
        "--config configs/doubling.yaml --config configs/smoke.yaml",
    )
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value, e.g. --set train.batch_size=64 (repeatable)",
    )


def cmd_prepare_data(args: argparse.Namespace) -> int:
    from vnca.data.prepare import prepare_data

    report = prepare_data(
        source=args.source, out_dir=args.out, raw_dir=args.raw_dir,
        download=args.download, tfds_dir=args.tfds_dir,
    )
    print(f"dataset written to {args.out} ({report.get('summary', '')})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vnca import config

    cfg = config.load(args.config, args.overrides)  # fail fast, before importing JAX
    from vnca.train import train_and_evaluate

    summary = train_and_evaluate(cfg, data_dir=args.data, out_dir=args.out, steps=args.steps)
    print(f"trained {summary['variant']} for {summary['steps']} steps; model in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from vnca.evaluate import evaluate

    metrics = evaluate(
        model_dir=args.model, data_dir=args.data, out_dir=args.out, overrides=args.overrides
    )
    iw = metrics.get("iwelbo") or {}
    mean = iw.get("mean_nats")
    bound = f"{mean:.2f} nats" if isinstance(mean, (int, float)) else "not finite"
    rec = metrics.get("reconstruction") or {}
    accuracy = rec.get("accuracy")
    recognised = (f"; {accuracy:.1%} of test reconstructions recognised"
                  if isinstance(accuracy, (int, float)) else "")
    print(f"IW bound (K={iw.get('k')}): {bound}{recognised}; results in {args.out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from vnca.report import build_report

    path = build_report(
        eval_dirs=args.evals, train_dirs=args.train, data_dir=args.data, out_dir=args.out
    )
    print(f"report: {path}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from pipeline.compile import compile_pipeline

    path = compile_pipeline(
        output=args.output, target=args.target, image=args.image, configs=args.config
    )
    print(f"compiled pipeline written to {path}")
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    from pipeline.local import run_local

    tier = "smoke" if args.smoke else "paper" if args.full else args.tier
    report = run_local(
        configs=args.config, root=args.root, runner=args.runner, tier=tier,
        data_source=args.data_source, raw_dir=args.raw_dir, image=args.image,
        overrides=args.overrides, verbose=args.verbose,
    )
    print(f"\npipeline finished; report: {report}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.pipeline import load_variants
    from vnca import plan

    if not 0 < args.utilisation <= 1:
        raise UserError(f"--utilisation must be in (0, 1], got {args.utilisation}")
    variants = load_variants(args.config or None, args.tier, args.overrides)
    plans = [plan.make_plan(v.config, args.target, args.utilisation) for v in variants]
    print(plan.format_plans(plans))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit

    submit(
        project=args.project, region=args.region, pipeline_root=args.pipeline_root,
        service_account=args.service_account, target=args.target, image=args.image,
        configs=args.config, dry_run=args.dry_run, tier="smoke" if args.smoke else "paper",
        overrides=args.overrides,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=DefaultsFormatter,
        description="Variational Neural Cellular Automata: data, training, evaluation, report "
        "and the Kubeflow pipeline that chains them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare-data", help="binarized MNIST with matched labels -> dataset.npz",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--source", choices=["raw", "tfds", "bundled"], default="bundled",
                   help="raw files in --raw-dir, TensorFlow Datasets, or the bundled sample")
    p.add_argument("--raw-dir", help="directory with binarized_mnist_*.amat[.gz] and MNIST idx .gz")
    p.add_argument("--download", action="store_true",
                   help="with --source raw: fetch the files into --raw-dir first")
    p.add_argument("--tfds-dir", help="with --source tfds: TFDS data_dir")
    p.add_argument("--out", required=True, help="output directory for dataset.npz and report")
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", help="train one variant (resumes from the latest checkpoint)",
                       formatter_class=DefaultsFormatter)
    _add_config_args(p, required=True)
    p.add_argument("--data", required=True, help="directory holding dataset.npz")
    p.add_argument("--out", required=True, help="output directory (checkpoints, metrics)")
    p.add_argument("--steps", type=int, help="override train.steps")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="IW bound, figures and probes for a trained model",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--model", required=True, help="directory written by `vnca train`")
    p.add_argument("--data", required=True, help="directory holding dataset.npz")
    p.add_argument("--out", required=True, help="output directory (metrics.json, figures)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override an eval.* value, e.g. eval.n_images=100")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="one HTML report over all evaluated variants",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--evals", nargs="+", required=True, help="directories from `vnca evaluate`")
    p.add_argument("--train", nargs="+", required=True, help="directories from `vnca train`")
    p.add_argument("--data", required=True, help="directory from `vnca prepare-data`")
    p.add_argument("--out", required=True, help="output directory (report.html, report.md)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("compile", help="compile the Kubeflow pipeline to YAML",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--output", default="pipeline.yaml", help="output file")
    p.add_argument("--target", choices=["local", "vertex-tpu", "vertex-gpu"], default="vertex-tpu",
                   help="where the pipeline runs: train and evaluate as TPU or GPU custom jobs, "
                   "or plain local steps")
    p.add_argument("--image", help="container image for every step (default: the target's "
                   "image in components/images.py; images/build.sh passes the tag it pushed)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="variant configs baked in as defaults (default: the three paper configs)")
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("run-local", help="run the whole pipeline locally with kfp.local",
                       formatter_class=DefaultsFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="variant configs; each gets its tier's overlay "
                   "(default: configs/baseline.yaml, doubling.yaml and nondoubling.yaml)")
    p.add_argument("--root", default="runs/local",
                   help="local pipeline root directory (runs, logs, the compilation cache)")
    p.add_argument("--runner", choices=["subprocess", "docker"], default="subprocess",
                   help="run each step as a subprocess of this Python or in the image")
    p.add_argument("--tier", choices=["demo", "cpu", "smoke", "paper"], default="demo",
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
    p.set_defaults(func=cmd_run_local)

    p = sub.add_parser("plan", help="what each variant's run will cost: FLOPs, memory, "
                       "wall time and chip-hours on its machine", formatter_class=DefaultsFormatter)
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="variant configs (default: the three paper configs)")
    p.add_argument("--tier", choices=["paper", "cpu", "demo", "smoke"], default="paper",
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
                   help="variant configs (default: the three paper configs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value in every variant (the job's config_* parameters)")
    p.add_argument("--smoke", action="store_true",
                   help="layer configs/smoke.yaml on the configs and use the bundled data sample "
                   "(a cheap end-to-end check of the Vertex AI setup)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the job's parameters and machine specs; contact nothing")
    p.set_defaults(func=cmd_submit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sys.unraisablehook = quiet_closed_event_loops(sys.unraisablehook)
    try:
        return args.func(args)
    except UserError as e:
        print(f"{PROG} {args.command}: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        problem = environment_problem(e)
        if problem is None:
            raise
        print(f"{PROG} {args.command}: error: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
