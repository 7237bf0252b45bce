"""``python -m trainer``: synth, check, train, evaluate, export-reviews (thin argparse layer).

    python -m trainer synth --out DIR [--per-class N] [--image-size PX] [--seed S] [--splits train=.7,val=.15,test=.15]
    python -m trainer check --data DIR
    python -m trainer train --data DIR [--recipe cpu] [--arch ARCH] [--epochs N] [--image-size PX]
                            [--batch-size B] [--config FILE.yaml] [--out RUN_DIR] [--resume]
                            [--pretrained none|package|hub|PATH] [--leakage drop|refuse|allow]
                            [--register] [--promote] [--demo] [--name NAME]
    python -m trainer evaluate --version ID --data DIR [--split test]
    python -m trainer export-reviews --out DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from core.config import ConfigError, get_settings
from core.logs import configure_logging

log = logging.getLogger("trainer")


def cmd_synth(args: argparse.Namespace) -> int:
    """Write a synthetic 3-class data set."""
    from trainer.synthetic import generate_dataset, parse_splits

    counts = generate_dataset(Path(args.out), args.per_class, args.image_size, args.seed, parse_splits(args.splits))
    total = sum(sum(c.values()) for c in counts.values())
    print(f"wrote {total} synthetic images (demo data, not real radiographs) to {args.out}: {counts}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Check a data folder; exit status 1 when it leaks across splits or has unreadable files."""
    from trainer.datacheck import check_dataset
    from trainer.evaluate import write_json

    report = check_dataset(Path(args.data), max_pixels=get_settings().max_image_pixels)
    print("\n".join(report.summary_lines()))
    if args.json:
        write_json(report.to_dict(), Path(args.json))
        print(f"full report: {args.json}")
    return 1 if report.has_leakage or report.unreadable else 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train, evaluate, calibrate; optionally register and promote the version."""
    from core.db import Database
    from core.migrate import check_schema
    from trainer.allocator import reuse_freed_memory
    from trainer.config import resolve_config
    from trainer.train import default_run_dir, register_run, run_training

    settings = get_settings()
    reuse_freed_memory()  # a third faster on CPU: no page faults for every batch's activations
    if args.register or args.promote:
        check_schema(settings.database_url)  # before hours of training, not after
    run_dir = Path(args.out) if args.out else default_run_dir(settings.data_dir, args.arch or "model")
    config_file = Path(args.config) if args.config else None
    if args.resume and config_file is None and (run_dir / "config.yaml").is_file():
        config_file = run_dir / "config.yaml"
    config = resolve_config(
        config_file=config_file,
        recipe=args.recipe,
        overrides={
            "arch": args.arch, "epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size,
            "pretrained": args.pretrained, "seed": args.seed, "max_per_class": args.max_per_class, "lr": args.lr,
            "leakage": "allow" if args.allow_leakage else args.leakage, "target_error": args.target_error,
        },
    )
    if not args.resume and (run_dir / "checkpoint.pt").exists():
        log.warning("%s holds an earlier run's checkpoint; starting afresh (use --resume to continue it)", run_dir)
    result = run_training(
        Path(args.data), config, run_dir, resume=args.resume,
        max_pixels=settings.max_image_pixels,
    )
    print(f"artifacts: {result.run_dir.resolve()} (model.safetensors, metrics.json, config.yaml, plots)")
    if args.register or args.promote:
        name = args.name or f"{config.arch} {result.run_dir.name}"
        version_id = register_run(result, Database(settings), settings, name, promote=args.promote, demo=args.demo)
        state = "production" if args.promote else "registered, not promoted"
        print(f"registered model version #{version_id} ({state}{', demo' if args.demo else ''})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a registered version on a data folder."""
    from core.db import Database
    from trainer.evaluate import format_report, write_json
    from trainer.evaluate import evaluate_version

    settings = get_settings()
    report, labels = evaluate_version(Database(settings), settings, args.version, Path(args.data), args.split)
    print(format_report(report, labels, f"version #{args.version} on {args.data} ({args.split})"))
    if args.json:
        write_json(report, Path(args.json))
    return 0


def cmd_export_reviews(args: argparse.Namespace) -> int:
    """Write reviewed images as DIR/<label>/... for the next training run."""
    from core.db import Database
    from trainer.export import export_reviews

    settings = get_settings()
    counts = export_reviews(Database(settings), settings, Path(args.out))
    print(f"exported {sum(counts.values())} reviewed images to {args.out}: {counts}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser."""
    parser = argparse.ArgumentParser(prog="python -m trainer", description="Train, evaluate and register bone X-ray models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic demo data set (not real radiographs)")
    synth.add_argument("--out", required=True)
    synth.add_argument("--per-class", type=int, default=100)
    synth.add_argument("--image-size", type=int, default=128)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--splits", default=None, help="e.g. train=0.7,val=0.15,test=0.15")
    synth.set_defaults(func=cmd_synth)

    check = sub.add_parser("check", help="check a data folder for unreadable files, duplicates and leakage")
    check.add_argument("--data", required=True)
    check.add_argument("--json", default=None, help="also write the full report here")
    check.set_defaults(func=cmd_check)

    train = sub.add_parser("train", help="train, evaluate, calibrate and optionally register a model")
    train.add_argument("--data", required=True)
    train.add_argument("--recipe", default=None, help="a named recipe: cpu (pretrained EfficientNet-Lite1, <= 30 min on 2 CPU cores)")
    train.add_argument("--arch", default=None, help="any timm architecture (default from recipe or config)")
    train.add_argument("--epochs", type=int)
    train.add_argument("--image-size", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--seed", type=int)
    train.add_argument("--max-per-class", type=int, help="subsample each split and class (quick runs)")
    train.add_argument(
        "--pretrained", default=None,
        help="none (default), package (installed weights package, no network), hub, or a .safetensors/.pth file",
    )
    train.add_argument("--target-error", type=float, help="certified error among unflagged images (default 0.05)")
    train.add_argument("--config", help="YAML file overriding the recipe")
    train.add_argument("--out", help="run folder (default: DATA_DIR/runs/<time>-<arch>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.add_argument("--register", action="store_true", help="record a model version in the database")
    train.add_argument("--promote", action="store_true", help="register and make it the production version")
    train.add_argument("--demo", action="store_true", help="mark the version as a demo (not for clinical use)")
    train.add_argument("--name", help="version name")
    train.add_argument(
        "--leakage", choices=("drop", "refuse", "allow"), default=None,
        help="images duplicated across splits: drop them from train/val (default), refuse to train, or allow",
    )
    train.add_argument("--allow-leakage", action="store_true", help="same as --leakage allow")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="evaluate a registered version on a data folder")
    evaluate.add_argument("--version", type=int, required=True)
    evaluate.add_argument("--data", required=True)
    evaluate.add_argument("--split", default="test", help="split folder to use when DIR has splits (default test)")
    evaluate.add_argument("--json", default=None)
    evaluate.set_defaults(func=cmd_evaluate)

    export = sub.add_parser("export-reviews", help="export reviewed images as DIR/<label>/...")
    export.add_argument("--out", required=True)
    export.set_defaults(func=cmd_export_reviews)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one line and exit non-zero."""
    from core.imaging import ImageDecodeError
    from core.registry import RegistryError

    args = build_parser().parse_args(argv)
    from core.ml.modelio import PretrainedUnavailable, WeightsError
    from trainer.config import ConfigFileError
    from trainer.data import DataError
    from trainer.datacheck import LeakageError
    from trainer.train import TrainingError
    from core.migrate import SchemaNotCurrent

    expected = (SchemaNotCurrent, ConfigError, ConfigFileError, DataError, LeakageError, TrainingError, PretrainedUnavailable, WeightsError, RegistryError, ImageDecodeError, ValueError)
    try:
        configure_logging(get_settings(), level="DEBUG" if args.verbose else None)
        return int(args.func(args))
    except expected as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
