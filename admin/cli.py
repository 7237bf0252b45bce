"""Admin CLI (`triage`): migrations, the model registry, and the embedded demo.

    triage db upgrade
    triage model register --weights W --arch A --labels a,b,c [--threshold T] [--promote]
    triage model list | triage model promote ID | triage model quantize ID --calibration DIR [--min-agreement 0.99] [--min-speedup 1]
    triage reconcile [--older-than SECONDS]
    triage demo [--host H] [--port P]
    triage user create NAME --role admin|reviewer|uploader [--password-stdin]
    triage user token NAME [--label L]

A top-level package above ``core``: it imports neither the portal, the worker nor the trainer;
the demo (:mod:`admin.demo`) starts them as separate processes, exactly as production does.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from admin.demo import cmd_demo
from core.config import ConfigError, Settings, get_settings
from core.db import Database, printable_url
from core.logs import configure_logging
from core.preprocessing import IMAGENET_MEAN, IMAGENET_STD, INTERPOLATIONS, Preprocessing

log = logging.getLogger("triage")


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    """Upgrade the configured database to the newest schema."""
    from core.migrate import upgrade

    upgrade(settings.database_url, args.revision)
    print(f"database at {printable_url(settings.database_url)} is at revision {args.revision}")
    return 0


def cmd_model_register(settings: Settings, args: argparse.Namespace) -> int:
    """Register weights (safetensors, or a weights-only PyTorch state_dict) as a model version."""
    from core import registry
    from core.ml.modelio import convert_to_safetensors

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    preprocessing = Preprocessing.build(  # refuses an unknown interpolation or a bad mean/std here, before anything is stored
        [3, args.image_size, args.image_size],
        args.mean.split(",") if args.mean else IMAGENET_MEAN,
        args.std.split(",") if args.std else IMAGENET_STD,
        args.interpolation,
    )
    registry.validate_metadata(labels, preprocessing, args.threshold, args.temperature)
    source = Path(args.weights)
    if not source.is_file():
        raise registry.RegistryError(f"weights file not found: {source}")
    with tempfile.TemporaryDirectory() as tmp:
        # Always load and re-save: checks the weights fit the architecture and never unpickles code.
        checked = convert_to_safetensors(source, Path(tmp) / "weights.safetensors", args.arch, len(labels))
        with Database(settings).transaction() as session:
            version = registry.register_version(
                session,
                settings,
                checked,
                name=args.name or f"{args.arch} from {source.name}",
                architecture=args.arch,
                labels=labels,
                preprocessing=preprocessing,
                threshold=args.threshold,
                temperature=args.temperature,
                extra={"imported_from": source.name},
            )
            if args.promote:
                registry.promote(session, version.id)
            print(f"registered model version #{version.id} ({version.weights_sha256[:12]}){' and promoted it' if args.promote else ''}")
    return 0


def cmd_model_list(settings: Settings, args: argparse.Namespace) -> int:
    """Print the registered model versions."""
    from core import registry

    with Database(settings).transaction() as session:
        versions = registry.list_versions(session)
        if args.json:
            print(json.dumps([
                {"id": v.id, "name": v.name, "architecture": v.architecture, "labels": v.labels,
                 "threshold": v.threshold, "production": v.is_production, "demo": v.is_demo,
                 "weights_sha256": v.weights_sha256}
                for v in versions
            ], indent=2))
            return 0
        if not versions:
            print("no model versions registered; use `triage model register` or `triage demo`")
        for v in versions:
            mark = "*" if v.is_production else " "
            print(f"{mark} #{v.id:<4} {v.architecture:<32} labels={','.join(v.labels)} threshold={v.threshold:.3f} {v.name}{' [demo]' if v.is_demo else ''}")
    return 0


def cmd_model_promote(settings: Settings, args: argparse.Namespace) -> int:
    """Make one version the production model (used for new studies)."""
    from core import registry

    with Database(settings).transaction() as session:
        version = registry.promote(session, args.version_id)
        print(f"model version #{version.id} ({version.name}) is now production")
    return 0


def cmd_model_quantize(settings: Settings, args: argparse.Namespace) -> int:
    """Build the int8 ONNX runtime of a version, calibrated on images from a folder."""
    from core import registry
    from core.ml.onnx_runtime import SECOND_OPINION_QUANTILE, SecondOpinion
    from core.ml.quantize import calibration_images, quantize_int8

    with Database(settings).transaction() as session:
        spec = registry.ModelSpec.from_version(registry.get_version(session, args.version_id))
    images = calibration_images(Path(args.calibration), args.count)
    build = quantize_int8(settings, spec, images, min_agreement=args.min_agreement, min_speedup=args.min_speedup)
    tried = ", ".join(f"{percentile}/{weights}: {agreement:.1%} at {build.speedups[(percentile, weights)]:.2f}x"
                      for (percentile, weights), agreement in build.tried.items())
    print(f"int8 runtime for model version #{spec.version_id}: labels agree with fp32 on {build.agreement:.1%} of "
          f"{build.held_out} held-out images, {build.speedup:.2f}x fp32's speed with its second opinions "
          f"(activation percentile {build.percentile}, {build.weights} weights; tried {tried})")
    if build.float_prefix:
        print(f"kept in float: the first layers, up to {build.float_prefix[-1]} (it amplified int8 rounding too much)")
    if build.unflagged:
        print(f"of the {build.unflagged} held-out images fp32 would not flag for review, int8 alone gives the same label "
              f"without a flag on {build.unflagged_kept} ({build.unflagged_kept / build.unflagged:.1%})")
    margins = build.second_opinion or SecondOpinion(0.0, 0.0)
    print(f"second opinion: fp32 decides the {build.asked_share:.1%} of held-out images whose int8 top-class log-odds lie within "
          f"{margins.log_odds_margin:.3f} of the threshold's or whose unfamiliar score lies within {margins.score_margin:.1%} "
          f"of the cut (the {SECOND_OPINION_QUANTILE:.0%} quantiles of int8's deviations from fp32 there)")
    if not build.installed:
        print(f"error: the int8 runtime was not installed: {build.refused_because} (--min-agreement "
              f"{args.min_agreement:.1%}, --min-speedup {args.min_speedup:g}); serve version #{spec.version_id} with "
              "TRIAGE_RUNTIME=onnx (fp32), or lower those options to install it anyway", file=sys.stderr)
        return 2
    print(f"installed at {build.path}; use it with TRIAGE_RUNTIME=onnx-int8")
    return 0


def _read_password(args: argparse.Namespace) -> str:
    """The new password: from stdin with --password-stdin, else asked twice at a prompt."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def cmd_user_create(settings: Settings, args: argparse.Namespace) -> int:
    """Create a portal account with a role (the password never appears on the command line)."""
    from core.auth import create_user

    password = _read_password(args)
    with Database(settings).transaction() as session:
        user = create_user(session, args.name, password, args.role)
        print(f"created user {user.username!r} with role {user.role}")
    return 0


def cmd_user_token(settings: Settings, args: argparse.Namespace) -> int:
    """Issue an API token for a user; it is printed once and only its hash is stored."""
    from core import audit
    from core.auth import AuthError, get_user, issue_token

    with Database(settings).transaction() as session:
        user = get_user(session, args.name)
        if user is None:
            raise AuthError(f"no user {args.name!r}; create one with `triage user create`")
        row, token = issue_token(session, user, args.label or "cli")
        audit.record(session, "token", user, "api_token", row.id, None, {"label": row.name, "via": "cli"})
    print(token)
    print(f"API token #{row.id} for {args.name}: send it as 'Authorization: Bearer <token>'. It is not shown again.", file=sys.stderr)
    return 0


def cmd_reconcile(settings: Settings, args: argparse.Namespace) -> int:
    """Re-enqueue images no task will finish: their worker is gone, or the broker lost their message."""
    from core.queue import make_celery
    from core.reconcile import reconcile

    requeued = reconcile(Database(settings), settings, make_celery(settings, main="cli"), older_than_s=args.older_than)
    total = sum(requeued.values())
    print(f"re-enqueued {total} image(s) in {len(requeued)} study(ies)" if total else "nothing to re-enqueue")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `triage` command."""
    parser = argparse.ArgumentParser(prog="triage", description="Bone X-ray triage admin commands.")
    sub = parser.add_subparsers(dest="command", required=True)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="db_command", required=True)
    up = db.add_parser("upgrade", help="upgrade the database to the newest schema")
    up.add_argument("revision", nargs="?", default="head")
    up.set_defaults(func=cmd_db_upgrade)

    model = sub.add_parser("model", help="model registry").add_subparsers(dest="model_command", required=True)
    reg = model.add_parser("register", help="register weights (.safetensors or a PyTorch state_dict .pth)")
    reg.add_argument("--weights", required=True, help="a .safetensors file or a torch.save(state_dict) file")
    reg.add_argument("--arch", required=True, help="timm architecture, e.g. tf_efficientnetv2_s.in21k_ft_in1k")
    reg.add_argument("--labels", required=True, help="class names in output order, comma-separated")
    reg.add_argument("--threshold", type=float, default=0.7, help="flag images whose top probability is below this")
    reg.add_argument("--temperature", type=float, default=1.0)
    reg.add_argument("--image-size", type=int, default=224)
    reg.add_argument("--interpolation", default="bilinear", help="resize filter: " + ", ".join(INTERPOLATIONS))
    reg.add_argument("--mean", help="comma-separated channel means (default ImageNet)")
    reg.add_argument("--std", help="comma-separated channel stds (default ImageNet)")
    reg.add_argument("--name")
    reg.add_argument("--promote", action="store_true", help="make it the production model")
    reg.set_defaults(func=cmd_model_register)
    lst = model.add_parser("list", help="list model versions")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cmd_model_list)
    pro = model.add_parser("promote", help="make a version the production model")
    pro.add_argument("version_id", type=int)
    pro.set_defaults(func=cmd_model_promote)

    rec = sub.add_parser("reconcile", help="re-enqueue images whose worker is gone (lease ran out) or whose message was lost "
                         "(workers do this by themselves every half lease)")
    rec.add_argument("--older-than", type=float,
                     help="re-enqueue images queued for longer than this many seconds whatever the broker holds "
                     "(default TRIAGE_RECONCILE_AFTER_S)")
    rec.set_defaults(func=cmd_reconcile)

    user = sub.add_parser("user", help="portal accounts and API tokens").add_subparsers(dest="user_command", required=True)
    ucreate = user.add_parser("create", help="create an account (password from a prompt or --password-stdin)")
    ucreate.add_argument("name")
    ucreate.add_argument("--role", required=True, choices=["admin", "reviewer", "uploader"])
    ucreate.add_argument("--password-stdin", action="store_true", help="read the password from the first line of stdin")
    ucreate.set_defaults(func=cmd_user_create)
    utoken = user.add_parser("token", help="issue an API token (printed once)")
    utoken.add_argument("name")
    utoken.add_argument("--label", help="what the token is for, e.g. 'PACS export script'")
    utoken.set_defaults(func=cmd_user_token)

    qnt = model.add_parser("quantize", help="build the int8 ONNX runtime of a version (TRIAGE_RUNTIME=onnx-int8)")
    qnt.add_argument("version_id", type=int)
    qnt.add_argument("--calibration", required=True, help="folder of validation images (searched recursively)")
    qnt.add_argument("--count", type=int, default=256, help="images to use: half calibrate, half check agreement with fp32")
    qnt.add_argument("--min-agreement", type=float, default=0.99,
                     help="refuse to install the int8 runtime when its labels agree with fp32 on fewer held-out images (0-1)")
    qnt.add_argument("--min-speedup", type=float, default=1.0,
                     help="choose only int8 candidates at least this many times as fast as fp32 on the held-out images, timed here")
    qnt.set_defaults(func=cmd_model_quantize)

    demo = sub.add_parser("demo", help="run portal + worker on the embedded default (SQLite, no broker server)")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--train-data", help="train the first model on this data folder instead of synthetic data")
    demo.add_argument("--no-sample", action="store_true", help="do not queue the sample study")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `triage` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings, unset_default="WARNING")
    from core.migrate import SchemaNotCurrent, check_schema

    try:
        if args.command not in ("db", "demo"):  # those two bring the schema up to date themselves
            check_schema(settings.database_url)
        return int(args.func(settings, args))
    except (SchemaNotCurrent, ValueError, FileNotFoundError) as exc:  # RegistryError, WeightsError, bad files: user errors
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
