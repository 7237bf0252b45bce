"""The fit loop and a whole training run: check, train, evaluate, calibrate, save, register.

Recipe (all from :class:`trainer.config.TrainConfig`): Adam, cross-entropy, ReduceLROnPlateau on
validation accuracy, early stopping with the best weights restored, a fixed seed. Every epoch ends
with a checkpoint holding the model, optimizer, scheduler, early-stopping state and every random
number generator, so a run killed at any point resumes and ends with the same weights as one that
was never interrupted. On CUDA: bf16 autocast and channels_last; CPU works too.
"""

from __future__ import annotations

import logging
import math
import random
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from timm.utils import ModelEmaV3
from tqdm import tqdm

from core.files import atomic_target
from core.ml.modelio import build_model, feature_layer_sizes, save_weights
from core.ml.predict import Predictor, resolve_device
from core.preprocessing import Preprocessing
from core.registry import ModelSpec
from core.ml.unfamiliar import UnfamiliarReference, fit_reference
from trainer.calibrate import ThresholdChoice, choose_threshold, fit_temperature, softmax
from trainer.config import TrainConfig, save_config
from trainer.data import (
    DEFAULT_MAX_PIXELS,
    TrainingDataset,
    class_counts,
    class_names,
    class_weights,
    dataset_fingerprint,
    eval_tensors,
    list_samples,
    weighted_sampler,
)
from trainer.datacheck import DataCheckReport, LeakageError, check_dataset
from trainer.evaluate import classification_report, expected_calibration_error, format_report, save_plots, write_json
from trainer.synthetic import is_synthetic

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
WEIGHTS = "model.safetensors"
REFERENCE = "unfamiliar_reference.safetensors"
EpochCallback = Callable[[int, dict[str, float]], None]


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, unusable data, a checkpoint of another run)."""


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return the generator that orders the training samples."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [numpy_state[0], torch.from_numpy(numpy_state[1].astype(np.int64)), int(numpy_state[2]), int(numpy_state[3]), float(numpy_state[4])],
        "torch": torch.get_rng_state(),
        "sampler": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    version, keys, *rest = state["python"]
    random.setstate((version, tuple(keys), *rest))
    name, keys_np, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys_np.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, so a kill during the write leaves the previous checkpoint intact."""
    with atomic_target(path, suffix=".tmp") as tmp:
        torch.save(payload, tmp)


def freeze_early_stages(model: nn.Module, stages: int) -> None:
    """Keep the stem and the first ``stages`` stages of a timm model at their current weights.

    The frozen layers get no gradients, so the backward pass stops before them: on two CPU cores
    freezing EfficientNet-Lite0's stem and first two stages doubles training images/s
    (bench/README.md). Their batch-norm statistics still follow the training images.

    Raises:
        TrainingError: when ``model`` has no ``blocks``/``stages`` sequence or fewer stages than asked.
    """
    if stages <= 0:
        return
    sequence = getattr(model, "blocks", None)
    if sequence is None:
        sequence = getattr(model, "stages", None)
    if not isinstance(sequence, nn.Sequential) or len(sequence) <= stages:
        raise TrainingError(
            f"freeze_stages={stages}: {type(model).__name__} has no stage sequence with more than {stages} stages"
        )
    stems = [getattr(model, name) for name in ("conv_stem", "bn1", "stem") if isinstance(getattr(model, name, None), nn.Module)]
    for module in [*stems, *sequence[:stages]]:
        for parameter in module.parameters():
            parameter.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("froze the stem and the first %d stages; %d parameters left to train", stages, trainable)


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """Config keys that must match for a resume (the epoch budget may be extended)."""
    return {k: v for k, v in config.items() if k not in ("epochs", "num_workers", "device")}


@torch.inference_mode()
def _validate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, batch_size: int, device: torch.device) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on preprocessed tensors."""
    model.eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(targets), batch_size):
        x = images[start : start + batch_size].to(device)
        y = targets[start : start + batch_size].to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = model(x).float()
        else:
            logits = model(x)
        total_loss += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    n = max(len(targets), 1)
    return total_loss / n, correct / n


def _optimizer_and_schedule(model: nn.Module, config: TrainConfig, steps_per_epoch: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer and learning-rate schedule the config names (one-cycle steps per batch)."""
    optimizer_class = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.schedule == "onecycle":
        scheduler: Any = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=max(steps_per_epoch, 1),
            pct_start=config.warmup_fraction, anneal_strategy="cos",
        )
    else:
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience, min_lr=config.min_lr
        )
    return optimizer, scheduler


@dataclass
class FitResult:
    """What the fit loop produced (the model itself carries the restored best weights)."""

    history: list[dict[str, float]]
    best_epoch: int
    best_val_acc: float
    epochs_run: int
    stopped_early: bool
    seconds: float


def fit(
    model: nn.Module,
    train_set: TrainingDataset,
    val_images: torch.Tensor,
    val_targets: torch.Tensor,
    config: TrainConfig,
    run_dir: Path,
    generator: torch.Generator,
    num_classes: int,
    resume: bool = False,
    on_epoch_end: EpochCallback | None = None,
) -> FitResult:
    """Train ``model`` in place; checkpoint every epoch in ``run_dir``; restore the best weights.

    Args:
        generator: the seeded generator that orders training samples (saved in checkpoints).
        resume: continue from ``run_dir/checkpoint.pt`` (same config; more epochs allowed).
        on_epoch_end: called with ``(epoch, metrics)`` after each checkpoint (tests, progress).

    Raises:
        TrainingError: on a NaN/inf loss, or a checkpoint whose config differs from ``config``.
    """
    device = resolve_device(config.device)
    # channels_last trains about twice as fast on CPU too (bench/README.md); serving keeps its own layout.
    model.to(device).to(memory_format=torch.channels_last)
    weight = class_weights(train_set.samples, num_classes).to(device) if config.balance == "loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)
    if config.balance == "sampler":
        loader = DataLoader(
            train_set, batch_size=config.batch_size, sampler=weighted_sampler(train_set.samples, num_classes, generator),
            num_workers=config.num_workers, generator=generator, pin_memory=device.type == "cuda",
        )
    else:
        loader = DataLoader(
            train_set, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers, generator=generator,
            pin_memory=device.type == "cuda",  # page-locked batches copy to the GPU asynchronously
        )
    optimizer, scheduler = _optimizer_and_schedule(model, config, steps_per_epoch=len(loader))
    per_step = config.schedule == "onecycle"
    # An exponential moving average of the weights (config.ema_decay > 0) is what gets validated,
    # kept and registered: it averages out the last steps' noise.
    ema = ModelEmaV3(model, decay=config.ema_decay) if config.ema_decay > 0 else None
    evaluated: nn.Module = model if ema is None else ema.module

    checkpoint_path = run_dir / CHECKPOINT
    history: list[dict[str, float]] = []
    best = {"val_acc": -1.0, "val_loss": math.inf, "epoch": 0, "state": None}
    bad_epochs, start_epoch, stopped = 0, 0, False
    elapsed = 0.0
    if resume:
        if not checkpoint_path.is_file():
            raise TrainingError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        if _comparable(checkpoint["config"]) != _comparable(config.to_dict()):
            differing = sorted(k for k in _comparable(config.to_dict()) if checkpoint["config"].get(k) != config.to_dict()[k])
            raise TrainingError(f"cannot resume {run_dir}: its checkpoint was made with different settings ({', '.join(differing)})")
        model.load_state_dict(checkpoint["model"])
        if ema is not None:
            ema.module.load_state_dict(checkpoint["ema"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        history = list(checkpoint["history"])
        best = dict(checkpoint["best"])
        bad_epochs, start_epoch, stopped = int(checkpoint["bad_epochs"]), int(checkpoint["epoch"]), bool(checkpoint["stopped"])
        elapsed = float(checkpoint.get("seconds", 0.0))
        _set_rng_state(checkpoint["rng"], generator)
        log.info("resumed %s after epoch %d", run_dir, start_epoch)

    use_amp = device.type == "cuda"
    for epoch in range(start_epoch + 1, config.epochs + 1):
        if stopped:
            break
        started = time.perf_counter()
        model.train()
        seen, loss_sum, correct = 0, 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch}/{config.epochs}", leave=False, disable=None)
        for step, (x, y) in enumerate(bar):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = x.contiguous(memory_format=torch.channels_last)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                logits = model(x)
                loss = criterion(logits.float(), y)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss became {float(loss.detach())} at epoch {epoch} step {step}: lower the learning rate (now "
                    f"{optimizer.param_groups[0]['lr']:.2e}) or check the data; the last good checkpoint is {checkpoint_path}"
                )
            loss.backward()
            optimizer.step()
            if ema is not None:
                ema.update(model)
            if per_step:
                scheduler.step()
            seen += len(y)
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
        train_seconds = time.perf_counter() - started  # the loss read each step waits for the GPU
        val_loss, val_acc = _validate(evaluated, val_images, val_targets, config.batch_size * 2, device)
        if not per_step:
            scheduler.step(val_acc)
        improved = val_acc > best["val_acc"] + 1e-12 or (abs(val_acc - best["val_acc"]) <= 1e-12 and val_loss < best["val_loss"])
        if improved:
            best = {"val_acc": val_acc, "val_loss": val_loss, "epoch": epoch, "state": {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}}
            bad_epochs = 0
        else:
            bad_epochs += 1
        seconds = time.perf_counter() - started
        elapsed += seconds
        row = {
            "epoch": epoch, "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "val_loss": val_loss, "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
            "train_images_per_second": seen / max(train_seconds, 1e-9),
        }
        history.append(row)
        log.info(
            "epoch %d/%d train_loss=%.4f train_acc=%.4f val_loss=%.4f val_acc=%.4f lr=%.2e %.1fs (%.1f min) %.0f images/s%s",
            epoch, config.epochs, row["train_loss"], row["train_acc"], val_loss, val_acc, row["lr"], seconds, seconds / 60,
            row["train_images_per_second"], " *" if improved else "",
        )
        if bad_epochs >= config.early_stopping_patience:
            stopped = True
            log.info("early stopping after epoch %d: no better validation accuracy for %d epochs", epoch, bad_epochs)
        _save_checkpoint(
            checkpoint_path,
            {
                "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "ema": None if ema is None else ema.module.state_dict(),
                "best": best, "bad_epochs": bad_epochs, "stopped": stopped, "history": history, "seconds": elapsed,
                "rng": _rng_state(generator), "config": config.to_dict(),
            },
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    model.to(memory_format=torch.contiguous_format)  # as the worker loads it from safetensors
    if best["state"] is not None:
        model.load_state_dict(best["state"])
        log.info("restored the best weights (epoch %d, val_acc=%.4f)", best["epoch"], best["val_acc"])
    return FitResult(history, int(best["epoch"]), float(best["val_acc"]), len(history), stopped, elapsed)


def epoch_speed(history: list[dict[str, float]]) -> dict[str, float | None]:
    """Mean training images/s and minutes per epoch (training and validation) over the epochs in ``history``.

    Rows of checkpoints made before images/s was recorded count for minutes only.
    """
    rates = [row["train_images_per_second"] for row in history if "train_images_per_second" in row]
    return {
        "train_images_per_second": round(sum(rates) / len(rates), 1) if rates else None,
        "minutes_per_epoch": round(sum(row["seconds"] for row in history) / len(history) / 60, 3) if history else None,
    }


def code_version() -> str:
    """``git describe``-like id of the code (commit, ``-dirty`` when modified), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "core", "trainer"], cwd=root, capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


@dataclass
class RunResult:
    """Artifacts and numbers of a finished run, ready to register."""

    run_dir: Path
    weights_file: Path
    architecture: str
    labels: list[str]
    preprocessing: Preprocessing
    temperature: float
    threshold: float
    metrics: dict[str, Any]
    extra: dict[str, Any]
    config: TrainConfig
    datacheck: DataCheckReport | None = None
    version_id: int | None = None
    fit: FitResult | None = field(default=None, repr=False)
    reference_file: Path | None = None


def default_run_dir(base: Path, arch: str) -> Path:
    """``base/runs/<UTC timestamp>-<arch>``."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return Path(base) / "runs" / f"{stamp}-{arch.replace('/', '_')}"


def run_training(
    data_dir: Path,
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    check: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_epoch_end: EpochCallback | None = None,
) -> RunResult:
    """Check the data, train, restore the best weights, calibrate, evaluate on test, save artifacts.

    Artifacts in ``run_dir``: ``config.yaml`` (resolved), ``checkpoint.pt``, ``model.safetensors``,
    ``metrics.json``, ``datacheck.json`` and PNG plots.

    Raises:
        LeakageError: when the check finds cross-split leakage and ``config.leakage`` is ``refuse``.
        TrainingError: on NaN loss, empty splits or an incompatible checkpoint.
    """
    data_dir = Path(data_dir).resolve()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = class_names(data_dir)
    save_config(config, run_dir / "config.yaml")

    report: DataCheckReport | None = None
    excluded: set[Path] = set()
    dropped: dict[str, int] = {}
    leakage = config.leakage
    if check:
        report = check_dataset(data_dir, max_pixels=max_pixels)
        write_json(report.to_dict(), run_dir / "datacheck.json")
        for line in report.summary_lines():
            log.info("data check: %s", line)
        if report.has_leakage and leakage == "refuse":
            raise LeakageError(
                f"the data set leaks across splits ({report.leakage_summary()}); see {run_dir / 'datacheck.json'}. "
                "Fix the splits, or train with leakage: drop (remove the copies from train/val) or allow"
            )
        excluded = {data_dir / p for p, _ in report.unreadable}
        if leakage == "drop":
            leaking = report.files_to_drop()
            dropped = {split: len(files) for split, files in leaking.items()}
            excluded |= {data_dir / p for files in leaking.values() for p in files}
            log.info("removed near/exact duplicates of other splits and conflicting labels: %s", dropped)

    samples = {
        split: [s for s in list_samples(data_dir, split, labels, config.max_per_class, config.seed) if s.path not in excluded]
        for split in ("train", "val", "test")
    }
    for split, items in samples.items():
        if not items:
            raise TrainingError(f"the {split} split of {data_dir} has no readable images")
    log.info("classes %s; images train=%d val=%d test=%d", labels, *(len(samples[s]) for s in ("train", "val", "test")))

    generator = seed_everything(config.seed)
    preprocessing = config.preprocessing()
    model = build_model(config.arch, len(labels), config.pretrained, drop_rate=config.drop_rate)
    freeze_early_stages(model, config.freeze_stages)
    train_set = TrainingDataset(samples["train"], preprocessing, config.augmentation, max_pixels)
    val_x, val_y, val_kept = eval_tensors(samples["val"], preprocessing, max_pixels)
    test_x, test_y, test_kept = eval_tensors(samples["test"], preprocessing, max_pixels)
    result = fit(model, train_set, val_x, val_y, config, run_dir, generator, len(labels), resume=resume, on_epoch_end=on_epoch_end)

    weights_file = save_weights(model, run_dir / WEIGHTS, {"architecture": config.arch, "labels": ",".join(labels)})
    train_x, train_y, _ = eval_tensors(samples["train"], preprocessing, max_pixels)
    trust = calibrate_and_certify(model, config, labels, preprocessing, (train_x, train_y), (val_x, val_y), (test_x, test_y))
    del train_x
    reference_file = trust.reference.save(run_dir / REFERENCE)
    choice, temperature, val_report, test_report = trust.choice, trust.temperature, trust.val_report, trust.test_report

    fingerprint = dataset_fingerprint(data_dir, {"train": samples["train"], "val": val_kept, "test": test_kept})
    metrics = {
        "test": test_report,
        "val": val_report,
        "temperature": temperature,
        "threshold_choice": choice.to_dict(),
        "guarantee": guarantee(choice),
        "unfamiliar": {"cut": trust.reference.cut, "quantile": trust.reference.quantile, "val_flag_rate": val_report["unfamiliar_rate"]},
        "validation_distributions": trust.validation_distributions,
        "best_epoch": result.best_epoch,
        "best_val_acc": result.best_val_acc,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.seconds, 2),
        **epoch_speed(result.history),
        "history": result.history,
    }
    write_json(metrics, run_dir / "metrics.json")
    save_plots(run_dir, test_report, labels, result.history)
    print(format_report(test_report, labels, "test"))
    extra = {
        "data_dir": str(data_dir),
        "data_fingerprint": fingerprint,
        "synthetic_data": is_synthetic(data_dir),
        "counts": {split: dict(zip(labels, class_counts(items, len(labels)))) for split, items in samples.items()},
        "code_version": code_version(),
        "config": config.to_dict(),
        "run_dir": str(run_dir.resolve()),
        "datacheck": report.summary() if report else None,
        "leakage": leakage,
        "dropped_for_leakage": dropped,
    }
    write_json(extra, run_dir / "run.json")
    return RunResult(
        run_dir, weights_file, config.arch, labels, preprocessing, temperature, choice.threshold, metrics, extra, config, report,
        fit=result, reference_file=reference_file,
    )


@dataclass
class Trust:
    """What makes a trained model's flags trustworthy: calibration, reference, certified threshold."""

    temperature: float
    reference: UnfamiliarReference
    choice: ThresholdChoice
    val_report: dict[str, Any]
    test_report: dict[str, Any]
    validation_distributions: dict[str, dict[str, list[float]]]


def calibrate_and_certify(
    model: nn.Module,
    config: TrainConfig,
    labels: list[str],
    preprocessing: Preprocessing,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
) -> Trust:
    """Temperature on val; unfamiliar reference on train features, its cut on val; certified threshold on val; test report.

    Everything runs through the worker's :class:`Predictor` (one forward pass gives logits and
    features), so the report describes what serving does.
    """
    raw_spec = ModelSpec(0, config.arch, labels, preprocessing, threshold=0.5, temperature=1.0, weights_sha256="")
    predictor = Predictor.from_model(raw_spec, model, device=config.device, batch_size=config.batch_size * 2)
    train_features = predictor.predict_outputs(train[0])[1]
    val_logits, val_features = predictor.predict_outputs(val[0])
    test_logits, test_features = predictor.predict_outputs(test[0])
    val_y, test_y = val[1].numpy(), test[1].numpy()
    reference = fit_reference(
        train_features, train[1].numpy(), val_features, config.unfamiliar_quantile, train_inputs=train[0],
        layer_sizes=feature_layer_sizes(model, preprocessing.input_size),
    )
    val_scores, test_scores = reference.scores(val_features), reference.scores(test_features)
    val_problems, test_problems = reference.input_problems(val[0]), reference.input_problems(test[0])
    temperature = fit_temperature(val_logits, val_y)
    val_probs, test_probs = softmax(val_logits, temperature), softmax(test_logits, temperature)
    choice = choose_threshold(
        val_probs, val_y, config.threshold_target, config.target_error, config.target_flag_rate, config.delta,
        eligible=~reference.is_unfamiliar(val_scores, val_problems),
    )
    val_report = classification_report(val_probs, val_y, labels, choice.threshold, config.ece_bins, val_scores, reference.cut, val_problems)
    test_report = classification_report(test_probs, test_y, labels, choice.threshold, config.ece_bins, test_scores, reference.cut, test_problems)
    test_report["ece_uncalibrated"] = expected_calibration_error(softmax(test_logits, 1.0), test_y, config.ece_bins)
    test_report["nll_uncalibrated"] = _nll(softmax(test_logits, 1.0), test_y)
    test_report["nll_calibrated"] = _nll(test_probs, test_y)
    distributions = {"confidence": quantile_histogram(val_probs.max(axis=1)), "unfamiliar_score": quantile_histogram(val_scores)}
    return Trust(temperature, reference, choice, val_report, test_report, distributions)


def quantile_histogram(values: np.ndarray, bins: int = 10) -> dict[str, list[float]]:
    """Equal-mass bins of ``values`` (edges at its quantiles; ties merged) and their counts.

    Stored with the version as its validation distribution; production days are binned with the
    same edges (values beyond them count in the end bins) to compute drift.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return {"edges": [], "counts": []}
    edges = np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) < 2:
        edges = np.array([edges[0], edges[0] + 1e-9])
    inner = np.clip(np.searchsorted(edges[1:-1], values, side="right"), 0, len(edges) - 2)
    counts = np.bincount(inner, minlength=len(edges) - 1)
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def guarantee(choice: ThresholdChoice) -> dict[str, Any]:
    """The promise stored with a version: target, delta, certified bound and coverage on validation."""
    return {
        "target_error": choice.target_value if choice.target == "error" else None,
        "delta": choice.delta,
        "threshold": choice.threshold,
        "bound": choice.bound,
        "coverage": choice.coverage,
        "n": choice.n,
        "certified": bool(choice.met and choice.target == "error"),
    }


def _nll(probs: np.ndarray, targets: np.ndarray) -> float:
    if len(targets) == 0:
        return 0.0
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(targets)), targets], 1e-12, None))))


def registry_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The compact metrics stored with a model version (full report stays in the run folder)."""
    test = {k: v for k, v in metrics["test"].items() if k != "reliability"}
    return {
        "test": test,
        "val_accuracy": metrics["val"]["accuracy"],
        "temperature": metrics["temperature"],
        "threshold_choice": metrics["threshold_choice"],
        "guarantee": metrics.get("guarantee"),
        "unfamiliar": metrics.get("unfamiliar"),
        "validation_distributions": metrics.get("validation_distributions"),
        "best_epoch": metrics["best_epoch"],
        "epochs_run": metrics["epochs_run"],
        "train_seconds": metrics["train_seconds"],
        "train_images_per_second": metrics.get("train_images_per_second"),
        "minutes_per_epoch": metrics.get("minutes_per_epoch"),
    }


def register_run(result: RunResult, db: Any, settings: Any, name: str, promote: bool = False, demo: bool = False) -> int:
    """Record a finished run as a model version (optionally production); returns its id."""
    from core import registry

    with db.transaction() as session:
        version = registry.register_version(
            session, settings, result.weights_file, name=name, architecture=result.architecture, labels=result.labels,
            preprocessing=result.preprocessing, threshold=result.threshold, temperature=result.temperature,
            metrics=registry_metrics(result.metrics), extra=result.extra, is_demo=demo, reference_file=result.reference_file,
        )
        if promote:
            registry.promote(session, version.id)
        result.version_id = version.id
        return version.id
