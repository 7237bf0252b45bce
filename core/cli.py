"""Admin CLI (`triage`): migrations, the model registry, and the embedded demo.

    triage db upgrade
    triage model register --weights W --arch A --labels a,b,c [--threshold T] [--promote]
    triage model list | triage model promote ID | triage model quantize ID --calibration DIR [--min-agreement 0.99]
    triage reconcile [--older-than SECONDS]
    triage demo [--host H] [--port P]
    triage user create NAME --role admin|reviewer|uploader [--password-stdin]
    triage user token NAME [--label L]

This module imports neither the portal, the worker nor the trainer: the demo starts them as
separate processes, exactly as production does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core.config import ConfigError, Settings, get_settings
from core.db import Database

log = logging.getLogger("triage")


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    """Upgrade the configured database to the newest schema."""
    from core.migrate import upgrade

    upgrade(settings.database_url, args.revision)
    print(f"database at {_safe_url(settings.database_url)} is at revision {args.revision}")
    return 0


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cmd_model_register(settings: Settings, args: argparse.Namespace) -> int:
    """Register weights (safetensors, or a weights-only PyTorch state_dict) as a model version."""
    from core import registry
    from core.ml.modelio import convert_to_safetensors
    from core.ml.transforms import default_preprocessing

    labels = [label.strip() for label in args.labels.split(",") if label.strip()]
    preprocessing = default_preprocessing(args.image_size, args.interpolation)
    if args.mean:
        preprocessing["mean"] = [float(v) for v in args.mean.split(",")]
    if args.std:
        preprocessing["std"] = [float(v) for v in args.std.split(",")]
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
    from core.ml.onnx_runtime import calibration_images, quantize_int8

    with Database(settings).transaction() as session:
        spec = registry.ModelSpec.from_version(registry.get_version(session, args.version_id))
    images = calibration_images(Path(args.calibration), args.count)
    build = quantize_int8(settings, spec, images, min_agreement=args.min_agreement)
    tried = ", ".join(f"{percentile}: {agreement:.1%}" for percentile, agreement in build.tried.items())
    print(f"int8 runtime for model version #{spec.version_id}: labels agree with fp32 on {build.agreement:.1%} of "
          f"{build.held_out} held-out images (activation percentile {build.percentile}; tried {tried})")
    if build.unflagged:
        print(f"of the {build.unflagged} held-out images fp32 would not flag for review, int8 gives the same label "
              f"without a flag on {build.unflagged_kept} ({build.unflagged_kept / build.unflagged:.1%})")
    if not build.installed:
        print(f"error: int8 agreement {build.agreement:.1%} is below --min-agreement {args.min_agreement:.1%}: the int8 "
              f"runtime was not installed; serve version #{spec.version_id} with TRIAGE_RUNTIME=onnx (fp32), or pass "
              "--min-agreement 0 to install it anyway", file=sys.stderr)
        return 2
    print(f"installed at {build.path}; use it with TRIAGE_RUNTIME=onnx-int8")
    return 0


def _ensure_demo_model(settings: Settings, env: dict[str, str], train_data: Path | None) -> None:
    """Train and promote a small demo model when no production model exists."""
    from core import registry

    with Database(settings).transaction() as session:
        current = registry.production_version(session)
        if current is not None:
            print(f"production model: {current.display_name}")
            return
    data = train_data
    if data is None:
        data = settings.data_dir / "demo-data"
        if not (data / "train").is_dir():
            print("no model yet: generating a synthetic demo data set (not real radiographs)…")
            subprocess.run([sys.executable, "-m", "trainer", "synth", "--out", str(data), "--per-class", "150", "--image-size", "64"], env=env, check=True)
    if train_data is None:
        print(f"training a small demo model on {data} (demo, not for clinical use; about a minute on CPU)…")
        recipe = ["--arch", "test_resnet", "--image-size", "64", "--epochs", "12", "--name", "demo model (synthetic data)"]
    else:
        print(f"fine-tuning pretrained EfficientNet-Lite0 on {data} with the cpu recipe (under 30 minutes on 2 CPU cores)…")
        recipe = ["--recipe", "cpu", "--name", f"EfficientNet-Lite0, recipe cpu, on {data.name}"]
    subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--data", str(data), *recipe, "--out", str(settings.data_dir / "runs" / "demo"),
         "--register", "--promote", "--demo"],
        env=env, check=True,
    )


SAMPLE_STUDY_NAME = "Sample study (synthetic demo images)"


def _queue_sample_study(settings: Settings, data: Path) -> None:
    """Queue the demo data set's test images as a first study, so the portal has results to show (once)."""
    from sqlalchemy import select

    from core import registry
    from core.models import Study
    from core.queue import enqueue_images, make_celery
    from core.studies import add_upload, create_study

    files = sorted(p for p in (data / "test").glob("*/*") if p.is_file())[:48]
    if not files:
        return
    with Database(settings).transaction() as session:
        earlier = session.scalar(select(Study.id).where(Study.name == SAMPLE_STUDY_NAME).order_by(Study.id).limit(1))
        if earlier is not None:
            print(f"sample study #{earlier} was queued on an earlier start")
            return
        version = registry.production_version(session)
        assert version is not None
        study = create_study(session, SAMPLE_STUDY_NAME, version)
        image_ids = [add_upload(session, settings, study, f"{p.parent.name}/{p.name}", p.read_bytes()).id for p in files]
        study_id = study.id
    enqueue_images(make_celery(settings, main="demo"), study_id, image_ids, settings.chunk_size)
    print(f"queued sample study #{study_id} with {len(image_ids)} synthetic images")


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


def _ensure_demo_admin(settings: Settings) -> None:
    """With no account at all, create `admin` with a random password and print it once."""
    import secrets

    from core.auth import count_users, create_user

    with Database(settings).transaction() as session:
        if count_users(session):
            return
        password = secrets.token_urlsafe(12)
        create_user(session, "admin", password, "admin")
    print(f"\n  created portal user 'admin' with password: {password}\n  (shown once; add people with `triage user create NAME --role reviewer`)\n")


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    """Run everything on one machine: migrate, make sure a model exists, start worker and portal."""
    from core.migrate import upgrade

    env = dict(os.environ)
    env.setdefault("TRIAGE_DATA_DIR", str(settings.data_dir))
    upgrade(settings.database_url)
    print(f"database: {_safe_url(settings.database_url)}; broker: {settings.broker_url}")
    _ensure_demo_admin(settings)
    train_data = Path(args.train_data).resolve() if args.train_data else None
    _ensure_demo_model(settings, env, train_data)
    supervisor = Supervisor(env)
    supervisor.add("worker", [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO",
                              "--concurrency", str(settings.worker_concurrency)])
    supervisor.add("portal", [sys.executable, "-m", "gunicorn", "--bind", f"{args.host}:{args.port}", "--workers", "2",
                              "--timeout", "300", "portal:create_app()"])
    demo_data = settings.data_dir / "demo-data"
    if not args.no_sample and train_data is None and (demo_data / "test").is_dir():
        _queue_sample_study(settings, demo_data)
    print(f"\nportal: http://{args.host}:{args.port}/   (Ctrl-C stops portal and worker)\n")
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    try:
        supervisor.run()
    except KeyboardInterrupt:
        pass
    finally:
        supervisor.stop_all()
    return 0


class Supervisor:
    """Keeps the demo's processes running: one that dies is restarted, with back-off; the others go on.

    A restarted worker re-queues the work its predecessor held (its watchdog, :mod:`core.reconcile`),
    so killing it loses nothing.
    """

    #: Back-off between restarts of a process that keeps dying, in seconds; reset after a minute up.
    FIRST_DELAY, MAX_DELAY, STABLE_AFTER = 1.0, 30.0, 60.0

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}
        self.started: dict[str, float] = {}
        self.delay: dict[str, float] = {}
        self.restart_at: dict[str, float] = {}
        self.stopping = False

    def add(self, name: str, argv: list[str]) -> None:
        """Start ``argv`` as the process called ``name``."""
        self.argv[name] = argv
        self.delay[name] = self.FIRST_DELAY
        self._start(name)

    def _start(self, name: str) -> None:
        self.children[name] = subprocess.Popen(self.argv[name], env=self.env)
        self.started[name] = time.monotonic()
        self.restart_at.pop(name, None)

    def request_stop(self, *_: object) -> None:
        """Stop after the current check (the SIGTERM handler)."""
        self.stopping = True

    def check(self) -> None:
        """Restart every process that has exited, once its back-off has passed."""
        now = time.monotonic()
        for name, child in self.children.items():
            if child.poll() is None:
                continue
            if name not in self.restart_at:
                if now - self.started[name] >= self.STABLE_AFTER:
                    self.delay[name] = self.FIRST_DELAY
                self.restart_at[name] = now + self.delay[name]
                print(f"{name} (pid {child.pid}) exited with {child.returncode}; restarting it in {self.delay[name]:.0f} s",
                      file=sys.stderr, flush=True)
                self.delay[name] = min(self.MAX_DELAY, self.delay[name] * 2)
            elif now >= self.restart_at[name]:
                self._start(name)
                print(f"{name} restarted (pid {self.children[name].pid})", file=sys.stderr, flush=True)

    def run(self) -> None:
        """Supervise until :meth:`request_stop` (SIGTERM) or Ctrl-C."""
        while not self.stopping:
            self.check()
            time.sleep(0.5)

    def stop_all(self) -> None:
        """Terminate every process and wait for it (SIGKILL after 20 s)."""
        self.stopping = True
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        for child in self.children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


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
    reg.add_argument("--interpolation", default="bilinear")
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
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = get_settings()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
