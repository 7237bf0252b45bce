"""The embedded demo (``triage demo``): one machine, one command, the production processes.

Migrates the database, makes sure a portal account and a production model exist (training a small
demo model with ``python -m trainer`` when none does), then starts ``celery -A worker`` and the
portal (gunicorn) as separate processes, exactly as production does, and keeps them running.
It imports neither the portal, the worker nor the trainer.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.config import Settings
from core.db import Database, printable_url


def ensure_demo_model(settings: Settings, env: dict[str, str], train_data: Path | None) -> None:
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
        print(f"fine-tuning pretrained EfficientNet-Lite1 on {data} with the cpu recipe (under 30 minutes on 2 CPU cores)…")
        recipe = ["--recipe", "cpu", "--name", f"EfficientNet-Lite1, recipe cpu, on {data.name}"]
    subprocess.run(
        [sys.executable, "-m", "trainer", "train", "--data", str(data), *recipe, "--out", str(settings.data_dir / "runs" / "demo"),
         "--register", "--promote", "--demo"],
        env=env, check=True,
    )


SAMPLE_STUDY_NAME = "Sample study (synthetic demo images)"


def queue_sample_study(settings: Settings, data: Path) -> None:
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


def ensure_demo_admin(settings: Settings) -> None:
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
    print(f"database: {printable_url(settings.database_url)}; broker: {settings.broker_url}")
    ensure_demo_admin(settings)
    train_data = Path(args.train_data).resolve() if args.train_data else None
    ensure_demo_model(settings, env, train_data)
    supervisor = Supervisor(env)
    supervisor.add("worker", [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO",
                              "--concurrency", str(settings.worker_concurrency)])
    supervisor.add("portal", [sys.executable, "-m", "gunicorn", "--bind", f"{args.host}:{args.port}", "--workers", "2",
                              "--timeout", "300", "portal:create_app()"])
    demo_data = settings.data_dir / "demo-data"
    if not args.no_sample and train_data is None and (demo_data / "test").is_dir():
        queue_sample_study(settings, demo_data)
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
