"""`vnca` command line: parse arguments, call one library function, print where results are.

This module has the library's subcommands (prepare-data, train, evaluate, report; also
`python -m vnca.cli`). The `vnca` console script is `vnca_pipeline.cli`, which adds the
pipeline's subcommands (compile, run-local, plan, submit) to this parser: the library never
imports the pipeline.

Every subcommand is thin: library code lives in the modules it imports (lazily, so `vnca
report --help` never imports JAX). A `UserError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from vnca.errors import QuietFailedWrites, UserError, environment_problem, quiet_closed_event_loops

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
    print(f"dataset written to {args.out} ({report.summary})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from vnca import config, contracts

    cfg = config.load(args.config, args.overrides)  # fail fast, before importing JAX
    from vnca.train import train_and_evaluate

    summary = contracts.TrainSummary.from_dict(
        train_and_evaluate(cfg, data_dir=args.data, out_dir=args.out, steps=args.steps),
        "the training summary")
    print(f"trained {summary.variant} for {summary.steps} steps; model in {args.out}")
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


def build_parser(
    *extensions: Callable[[argparse._SubParsersAction], None],
) -> argparse.ArgumentParser:
    """The library's subcommands; each of `extensions` adds more to the subparsers."""
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

    for extend in extensions:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    """Run one subcommand of `parser` (default: the library's) and return the exit status."""
    args = (parser or build_parser()).parse_args(argv)
    sys.unraisablehook = quiet_closed_event_loops(sys.unraisablehook)
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, QuietFailedWrites) for f in asyncio_log.filters):
        asyncio_log.addFilter(QuietFailedWrites())
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
