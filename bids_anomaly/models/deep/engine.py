"""The training loop of the deep models: AMP, clipping, schedule, early stopping, checkpoints, DDP.

One function, :func:`train`, fits a network to healthy samples with AdamW, a linear warm-up then
cosine learning-rate schedule, gradient-norm clipping and mixed precision (bf16 on a GPU by
default). After every epoch it measures the loss on held-out healthy samples, keeps the best
weights, stops early when that loss has not improved for ``patience`` epochs, and writes a
checkpoint (atomically) from which a killed run resumes to exactly the state an uninterrupted run
would have reached. A loss that becomes NaN or infinite stops the run with an error: the weights
of a diverged run are never kept. Under ``torchrun`` the network is wrapped in
``DistributedDataParallel`` and every epoch is sharded with ``DistributedSampler``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from bids_anomaly.config import option, positive_int
from bids_anomaly.errors import TrainingError, UsageError
from bids_anomaly.models.deep import distributed

LOGGER = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LOSSES_FILE = "losses.tsv"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

LossFunction = Callable[[nn.Module, tuple[torch.Tensor, ...], torch.Generator | None],
                        torch.Tensor]
"""``loss(module, batch, generator)``: the training loss of one batch (``generator`` is None in
training, a fixed-seed generator for validation so that random corruptions repeat)."""


@dataclass
class EngineOptions:
    """How to train (not what: that is the model's hyperparameters).

    Parameters
    ----------
    epochs : int
        Largest number of passes over the training samples.
    batch_size : int
        Samples per step and per process.
    learning_rate : float
        Peak learning rate of AdamW.
    weight_decay : float
        AdamW weight decay.
    grad_clip : float
        Largest gradient norm (0: no clipping).
    patience : int
        Stop after this many epochs without a lower validation loss (0: never stop early).
    warmup_epochs : float
        Epochs of linear learning-rate warm-up.
    precision : str
        ``auto`` (bf16 on CUDA, fp32 on CPU), ``fp32``, ``bf16`` or ``fp16`` (with loss scaling).
    num_workers : int
        Data-loader worker processes per training process.
    seed : int
        Seed of the sample order and of every random draw of training.
    checkpoint_dir : Path, optional
        Where the per-epoch checkpoint and the loss log are written (none: no resume).
    tensorboard : Path, optional
        Write TensorBoard scalars there (needs the ``tensorboard`` package).
    progress : bool, optional
        Progress bars; by default only when the standard error is a terminal.
    """

    epochs: int = option(50, "most epochs (default {default})", flags=("--epochs",),
                         type=positive_int)
    batch_size: int = option(32, "samples per step and GPU (default {default})",
                             flags=("--batch-size",), type=positive_int)
    learning_rate: float = option(1e-3, "peak AdamW learning rate, warm-up then cosine "
                                        "(default {default})", flags=("--learning-rate",),
                                  type=float, metavar="LR")
    weight_decay: float = option(1e-5, "AdamW weight decay")
    grad_clip: float = option(1.0, "largest gradient norm (0: no clipping)")
    patience: int = option(10, "stop when the healthy validation loss has not improved for "
                               "this many epochs (0: never; default {default})",
                           flags=("--patience",), type=int, metavar="EPOCHS")
    warmup_epochs: float = option(1.0, "epochs of linear learning-rate warm-up")
    precision: str = option("auto", "auto: bf16 mixed precision on a GPU, fp32 on a CPU "
                                    "(default {default})", flags=("--precision",),
                            choices=PRECISIONS)
    num_workers: int = option(2, "data-loader worker processes per GPU (default {default})",
                              flags=("--num-workers",), type=int, metavar="N")
    seed: int = option(0, "seed of the sample order and every random draw (--random-seed)")
    checkpoint_dir: Path | None = option(help="per-epoch checkpoint and loss log")
    tensorboard: Path | None = option(help="also log the losses for TensorBoard in DIR (needs "
                                           "tensorboard)", flags=("--tensorboard",), type=Path,
                                      metavar="DIR")
    progress: bool | None = option(help="progress bars (default: on a terminal)")

    def describe(self) -> dict:
        """The options that change the result (for the model card and the resume check)."""
        values = asdict(self)
        for key in ("num_workers", "checkpoint_dir", "tensorboard", "progress"):
            values.pop(key)
        return values


def options_from_settings(settings, defaults: dict | None = None
                          ) -> tuple[EngineOptions, dict]:
    """A family's training options from a run's settings, and the family's other options.

    The seed is the run's ``--random-seed``, checkpoints go to ``WORK/train/model-<name>``;
    ``defaults`` (a family's own, e.g. the papers' epochs) yield to options given.
    """
    from bids_anomaly import bids

    given = settings.model.options
    names = {item.name for item in fields(EngineOptions)}
    name = settings.model.model_name or settings.model.model_type
    training = EngineOptions(**{
        **(defaults or {}), "seed": settings.execution.random_seed,
        "checkpoint_dir": bids.checkpoint_dir(settings.work_dir, name),
        **{key: value for key, value in given.items() if key in names}})
    return training, {key: value for key, value in given.items() if key not in names}


def rebuild(cls: type, hyperparameters: dict, what: str):
    """``cls(training=EngineOptions(...), **rest)`` from stored hyperparameters.

    Raises
    ------
    BadDataError
        Hyperparameters that ``cls`` does not take (``what`` names what they should describe).
    """
    from bids_anomaly.errors import BadDataError

    values = dict(hyperparameters)
    try:
        training = EngineOptions(**values.pop("training", {}))
        return cls(training=training, **values)
    except (KeyError, TypeError, ValueError) as error:
        raise BadDataError(f"the stored {cls.model_type} hyperparameters do not describe "
                           f"{what}: {str(error)[:300]}") from error


@dataclass
class TrainingResult:
    """What :func:`train` reports."""

    history: list[dict]
    best_epoch: int
    best_loss: float
    stopped_early: bool
    resumed_from: int
    seconds: float

    def report(self) -> dict:
        """JSON-ready summary for the model card."""
        return {"epochs_run": len(self.history), "best_epoch": self.best_epoch,
                "best_validation_loss": self.best_loss, "stopped_early": self.stopped_early,
                "resumed_from_epoch": self.resumed_from, "seconds": round(self.seconds, 1),
                "history": self.history}


class EpochSampler(Sampler[int]):
    """``DistributedSampler`` order for one epoch, with the epoch folded into the keys.

    Datasets receive ``epoch * len(dataset) + index`` so that persistent worker processes
    draw the same epoch-dependent samples as the main process would.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int) -> None:
        self.size = len(dataset)
        self.inner = DistributedSampler(dataset, num_replicas=distributed.world_size_now(),
                                        rank=distributed.rank(), shuffle=shuffle, seed=seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Order and samples of ``epoch``."""
        self.epoch = epoch
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (self.epoch * self.size + index for index in self.inner)

    def __len__(self) -> int:
        return len(self.inner)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: full float32)."""
    if precision not in PRECISIONS:
        raise UsageError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def fingerprint(values: dict) -> str:
    """Short hash of what a checkpoint belongs to."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def _loader(dataset: Dataset, sampler: Sampler, options: EngineOptions,
            device: torch.device) -> DataLoader:
    workers = options.num_workers
    # the loader's own generator: drawing worker seeds must not consume the global random
    # stream, or a resumed run would diverge from an uninterrupted one
    return DataLoader(dataset, batch_size=options.batch_size, sampler=sampler,
                      num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                      drop_last=False, generator=torch.Generator().manual_seed(options.seed))


def _schedule(optimizer: torch.optim.Optimizer, options: EngineOptions,
              steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, round(options.warmup_epochs * steps_per_epoch))
    total = max(warmup + 1, options.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / (total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _tensorboard(options: EngineOptions):
    if options.tensorboard is None or not distributed.is_main():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UsageError("--tensorboard needs the tensorboard package (pip install "
                         "tensorboard)") from error
    return SummaryWriter(str(options.tensorboard))


def _show_progress(options: EngineOptions) -> bool:
    if not distributed.is_main():
        return False
    return sys.stderr.isatty() if options.progress is None else options.progress


def _save_checkpoint(path: Path, state: dict) -> None:
    partial = path.with_suffix(".part")
    torch.save(state, partial)
    partial.replace(path)


def _write_losses(path: Path, history: list[dict]) -> None:
    if not history:
        return
    columns = list(history[0])
    lines = ["\t".join(columns)]
    lines += ["\t".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c])
                        for c in columns) for row in history]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class TrainingState:
    """Where training stands; saved in every checkpoint, so a resumed run continues from it.

    Attributes
    ----------
    epoch : int
        Epochs finished.
    best_loss, best_epoch : float, int
        The lowest validation loss so far and its epoch (1-based; 0 before the first).
    bad_epochs : int
        Epochs since the validation loss last improved.
    history : list of dict
        One row per finished epoch (the ``losses.tsv`` columns).
    best_state : dict or None
        The weights of the best epoch (on the CPU).
    stopped : bool
        Early stopping has ended training.
    """

    epoch: int = 0
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = None
    stopped: bool = False


class _Trainer:
    """One training run: the resume, epoch and end-of-epoch steps of :func:`train`."""

    def __init__(self, module: nn.Module, loss: LossFunction, train_set: Dataset,
                 validation_set: Dataset, options: EngineOptions, device: torch.device,
                 identity: dict) -> None:
        self.module, self.loss, self.options, self.device = module, loss, options, device
        module.to(device)
        self.wrapped: nn.Module = module
        if distributed.is_distributed():
            self.wrapped = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        self.dtype = autocast_dtype(options.precision, device)
        self.train_sampler = EpochSampler(train_set, shuffle=True, seed=options.seed)
        self.validation_sampler = EpochSampler(validation_set, shuffle=False, seed=options.seed)
        self.train_loader = _loader(train_set, self.train_sampler, options, device)
        self.validation_loader = _loader(validation_set, self.validation_sampler, options, device)
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=options.learning_rate,
                                           weight_decay=options.weight_decay)
        self.scheduler = _schedule(self.optimizer, options, len(self.train_loader))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        self.key = fingerprint({"identity": identity, "options": options.describe()})
        self.checkpoint_path = (Path(options.checkpoint_dir) / CHECKPOINT_FILE
                                if options.checkpoint_dir is not None else None)
        self.state = TrainingState()

    def resume(self) -> int:
        """Continue from the checkpoint of the same run, if any; return its epoch (0: none).

        Rank 0 reads the checkpoint and every rank resumes from the same state (no shared file
        system is needed).
        """
        path = self.checkpoint_path
        if path is None:
            return 0
        if distributed.is_main():
            path.parent.mkdir(parents=True, exist_ok=True)
        saved = None
        if distributed.is_main() and path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
        saved = distributed.broadcast(saved)
        if saved is None:
            return 0
        if saved.get("fingerprint") != self.key:
            if distributed.is_main():
                LOGGER.warning("%s belongs to another training run (other data or settings, "
                               "--epochs included: it shapes the learning-rate schedule); "
                               "starting afresh", path)
            return 0
        self.module.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng"])
        if self.device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"], self.device)
        self.state = TrainingState(**{item.name: saved[item.name]
                                      for item in fields(TrainingState)})
        if distributed.is_main():
            LOGGER.info("resuming from the checkpoint of epoch %d in %s", self.state.epoch, path)
        return self.state.epoch

    def run_epoch(self, epoch: int, progress: bool) -> dict:
        """Train one epoch; return its row of the loss history (without the validation)."""
        options, device, dtype = self.options, self.device, self.dtype
        epoch_start = time.monotonic()
        self.train_sampler.set_epoch(epoch)
        self.wrapped.train()
        running = torch.zeros((), dtype=torch.float64, device=device)
        waited = 0.0
        batches = iter(self.train_loader)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{options.epochs}",
                       unit="batch", leave=False)
        n_samples = 0
        while True:
            wait_start = time.monotonic()
            try:
                batch = next(batches)
            except StopIteration:
                break
            waited += time.monotonic() - wait_start
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                value = self.loss(self.wrapped, batch, None)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(value).backward()
            if options.grad_clip > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.module.parameters(), options.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            size = batch[0].shape[0]
            n_samples += size
            running += value.detach().double() * size  # no host sync per step
            if bar is not None:
                bar.update()
                if bar.n % 20 == 1:
                    bar.set_postfix(loss=f"{running.item() / n_samples:.4g}")
        if bar is not None:
            bar.close()
        train_seconds = time.monotonic() - epoch_start
        totals = distributed.all_sum(torch.stack([running.cpu(),
                                                  torch.tensor(n_samples, dtype=torch.float64)]))
        return {"epoch": epoch + 1, "train_loss": float(totals[0] / totals[1]),
                "learning_rate": self.scheduler.get_last_lr()[0], "started": epoch_start,
                "samples_per_second": round(float(totals[1]) / max(train_seconds, 1e-9), 2),
                "data_wait_fraction": round(waited / max(train_seconds, 1e-9), 4)}

    def end_epoch(self, row: dict, writer) -> None:
        """Validate, keep the best weights, stop early, log, write the checkpoint."""
        options, state = self.options, self.state
        validation = _evaluate(self.wrapped, self.loss, self.validation_loader,
                               self.validation_sampler, self.device, self.dtype, options.seed)
        started = row.pop("started")
        row = {"epoch": row["epoch"], "train_loss": row["train_loss"],
               "validation_loss": validation, "learning_rate": row["learning_rate"],
               "seconds": round(time.monotonic() - started, 3),
               "samples_per_second": row["samples_per_second"],
               "data_wait_fraction": row["data_wait_fraction"]}
        state.history.append(row)
        state.epoch = row["epoch"]
        if not (math.isfinite(row["train_loss"]) and math.isfinite(validation)):
            raise TrainingError(
                f"training diverged at epoch {row['epoch']}: train loss {row['train_loss']:.4g}"
                f", validation loss {validation:.4g}; nothing was saved: lower --learning-rate "
                f"(now {options.learning_rate:g}), or use --precision fp32")
        if validation < state.best_loss:
            state.best_loss, state.best_epoch, state.bad_epochs = validation, row["epoch"], 0
            state.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in
                                              self.module.state_dict().items()})
        else:
            state.bad_epochs += 1
        if options.patience and state.bad_epochs >= options.patience:
            state.stopped = True
            LOGGER.info("stopping early: no better validation loss for %d epochs (best %.5g "
                        "at epoch %d)", options.patience, state.best_loss, state.best_epoch)
        if distributed.is_main():
            LOGGER.info("epoch %d/%d: train loss %.5g, validation loss %.5g, %.1f samples/s, "
                        "%.0f%% of the time waiting for data", row["epoch"], options.epochs,
                        row["train_loss"], validation, row["samples_per_second"],
                        100 * row["data_wait_fraction"])
        if writer is not None:
            for name in ("train_loss", "validation_loss", "learning_rate",
                         "samples_per_second", "data_wait_fraction"):
                writer.add_scalar(name, row[name], row["epoch"])
        if self.checkpoint_path is not None and distributed.is_main():
            _save_checkpoint(self.checkpoint_path, {
                **{item.name: getattr(state, item.name) for item in fields(TrainingState)},
                "fingerprint": self.key, "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": (torch.cuda.get_rng_state(self.device)
                             if self.device.type == "cuda" else None),
            })
            _write_losses(self.checkpoint_path.parent / LOSSES_FILE, state.history)
        distributed.barrier()


def train(module: nn.Module, loss: LossFunction, train_set: Dataset, validation_set: Dataset,
          options: EngineOptions, device: torch.device, identity: dict) -> TrainingResult:
    """Fit ``module`` in place; on return it holds the weights of the best validation epoch.

    Parameters
    ----------
    module : torch.nn.Module
        The network, already initialised (seeded by the caller).
    loss : LossFunction
        Loss of one batch.
    train_set, validation_set : torch.utils.data.Dataset
        Items are tuples of tensors; keys arrive as ``epoch * len + index``.
    options : EngineOptions
        How to train.
    device : torch.device
        This process's device.
    identity : dict
        What is being trained (hyperparameters, subjects); a checkpoint of anything else is
        not resumed from.

    Returns
    -------
    TrainingResult
        Loss history and where the best epoch was.

    Raises
    ------
    TrainingError
        The training or validation loss of an epoch is NaN or infinite (the run diverged), or
        the device ran out of memory (the message names the batch size to lower).
    """
    start_time = time.monotonic()
    trainer = _Trainer(module, loss, train_set, validation_set, options, device, identity)
    resumed_from = trainer.resume()
    writer = _tensorboard(options)
    progress = _show_progress(options)
    for epoch in range(trainer.state.epoch, options.epochs):
        if trainer.state.stopped:
            break
        try:
            trainer.end_epoch(trainer.run_epoch(epoch, progress), writer)
        except RuntimeError as error:
            if not out_of_memory(error):
                raise
            if device.type == "cuda":
                torch.cuda.empty_cache()
            where = "GPU" if device.type == "cuda" else device.type.upper()
            raise TrainingError(
                f"out of memory training on the {where} with batches of "
                f"{options.batch_size} ({str(error).strip().splitlines()[0]}): lower "
                "--batch-size, or the network's size (--width; --patch-size in 3d)") from None
    if writer is not None:
        writer.close()
    state = trainer.state
    if state.best_state is not None:
        module.load_state_dict(state.best_state)
    module.eval()
    return TrainingResult(history=state.history, best_epoch=state.best_epoch,
                          best_loss=float(state.best_loss), stopped_early=state.stopped,
                          resumed_from=resumed_from, seconds=time.monotonic() - start_time)


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is PyTorch failing to allocate memory (on a GPU, or on the CPU).

    A CPU allocation that the system refuses raises a plain ``RuntimeError`` (the kernel may
    also kill the process instead, which nothing can catch).
    """
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _evaluate(module: nn.Module, loss: LossFunction, loader: DataLoader, sampler: EpochSampler,
              device: torch.device, dtype: torch.dtype | None, seed: int) -> float:
    """Mean loss over the validation samples (all ranks), with repeatable random draws."""
    module.eval()
    sampler.set_epoch(0)
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    totals = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for batch in loader:
            batch = tuple(t.to(device, non_blocking=True) for t in batch)
            with torch.autocast(device.type, dtype=dtype or torch.float32,
                                enabled=dtype is not None):
                value = loss(module, batch, generator)
            size = batch[0].shape[0]
            totals += torch.tensor([value.float().item() * size, size], dtype=torch.float64)
    totals = distributed.all_sum(totals)
    return float(totals[0] / max(float(totals[1]), 1.0))
