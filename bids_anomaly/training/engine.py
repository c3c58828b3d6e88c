"""The training loop of the deep models: AMP, clipping, schedule, early stopping, checkpoints, DDP.

One function, :func:`train`, fits a network to healthy samples with AdamW, a linear warm-up then
cosine learning-rate schedule, gradient-norm clipping and mixed precision (bf16 on a GPU by
default). After every epoch it measures the loss on held-out healthy samples, keeps the best
weights, stops early when that loss has not improved for ``patience`` epochs, and writes a
checkpoint (atomically) from which a killed run resumes to exactly the state an uninterrupted run
would have reached. Under ``torchrun`` the network is wrapped in ``DistributedDataParallel``
and every epoch is sharded with ``DistributedSampler``.
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
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from bids_anomaly.errors import UsageError
from bids_anomaly.training import distributed

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

    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    patience: int = 10
    warmup_epochs: float = 1.0
    precision: str = "auto"
    num_workers: int = 2
    seed: int = 0
    checkpoint_dir: Path | None = None
    tensorboard: Path | None = None
    progress: bool | None = None

    def describe(self) -> dict:
        """The options that change the result (for the model card and the resume check)."""
        values = asdict(self)
        for key in ("num_workers", "checkpoint_dir", "tensorboard", "progress"):
            values.pop(key)
        return values


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
    """
    start_time = time.monotonic()
    module.to(device)
    wrapped: nn.Module = module
    if distributed.is_distributed():
        wrapped = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    dtype = autocast_dtype(options.precision, device)
    train_sampler = EpochSampler(train_set, shuffle=True, seed=options.seed)
    validation_sampler = EpochSampler(validation_set, shuffle=False, seed=options.seed)
    train_loader = _loader(train_set, train_sampler, options, device)
    validation_loader = _loader(validation_set, validation_sampler, options, device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=options.learning_rate,
                                  weight_decay=options.weight_decay)
    scheduler = _schedule(optimizer, options, len(train_loader))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    key = fingerprint({"identity": identity, "options": options.describe()})
    checkpoint_path = None
    state = {"epoch": 0, "best_loss": math.inf, "best_epoch": 0, "bad_epochs": 0,
             "history": [], "best_state": None, "stopped": False}
    resumed_from = 0
    if options.checkpoint_dir is not None:
        checkpoint_path = Path(options.checkpoint_dir) / CHECKPOINT_FILE
        if distributed.is_main():
            checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        saved = None
        if distributed.is_main() and checkpoint_path.is_file():
            saved = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        # rank 0 reads, every rank resumes from the same state (no shared file system needed)
        saved = distributed.broadcast(saved)
        if saved is not None:
            if saved.get("fingerprint") == key:
                module.load_state_dict(saved["model"])
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                scaler.load_state_dict(saved["scaler"])
                torch.set_rng_state(saved["rng"])
                if device.type == "cuda" and saved.get("cuda_rng") is not None:
                    torch.cuda.set_rng_state(saved["cuda_rng"], device)
                state = {k: saved[k] for k in state}
                resumed_from = state["epoch"]
                if distributed.is_main():
                    LOGGER.info("resuming from the checkpoint of epoch %d in %s", resumed_from,
                                checkpoint_path)
            elif distributed.is_main():
                LOGGER.warning("%s belongs to another training run (other data or settings, "
                               "--epochs included: it shapes the learning-rate schedule); "
                               "starting afresh", checkpoint_path)
    writer = _tensorboard(options)
    progress = _show_progress(options)

    for epoch in range(state["epoch"], options.epochs):
        if state["stopped"]:
            break
        epoch_start = time.monotonic()
        train_sampler.set_epoch(epoch)
        wrapped.train()
        running = torch.zeros((), dtype=torch.float64, device=device)
        waited = 0.0
        batches = iter(train_loader)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(train_loader), desc=f"epoch {epoch + 1}/{options.epochs}",
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
                value = loss(wrapped, batch, None)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(value).backward()
            if options.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(module.parameters(), options.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
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
        validation = _evaluate(wrapped, loss, validation_loader, validation_sampler, device,
                               dtype, options.seed)
        row = {"epoch": epoch + 1, "train_loss": float(totals[0] / totals[1]),
               "validation_loss": validation, "learning_rate": scheduler.get_last_lr()[0],
               "seconds": round(time.monotonic() - epoch_start, 3),
               "samples_per_second": round(float(totals[1]) / max(train_seconds, 1e-9), 2),
               "data_wait_fraction": round(waited / max(train_seconds, 1e-9), 4)}
        state["history"].append(row)
        state["epoch"] = epoch + 1
        if validation < state["best_loss"]:
            state.update(best_loss=validation, best_epoch=epoch + 1, bad_epochs=0,
                         best_state=copy.deepcopy({k: v.detach().cpu() for k, v in
                                                   module.state_dict().items()}))
        else:
            state["bad_epochs"] += 1
        if options.patience and state["bad_epochs"] >= options.patience:
            state["stopped"] = True
            LOGGER.info("stopping early: no better validation loss for %d epochs (best %.5g "
                        "at epoch %d)", options.patience, state["best_loss"],
                        state["best_epoch"])
        if distributed.is_main():
            LOGGER.info("epoch %d/%d: train loss %.5g, validation loss %.5g, %.1f samples/s, "
                        "%.0f%% of the time waiting for data", epoch + 1, options.epochs,
                        row["train_loss"], validation, row["samples_per_second"],
                        100 * row["data_wait_fraction"])
        if writer is not None:
            for name in ("train_loss", "validation_loss", "learning_rate",
                         "samples_per_second", "data_wait_fraction"):
                writer.add_scalar(name, row[name], epoch + 1)
        if checkpoint_path is not None and distributed.is_main():
            _save_checkpoint(checkpoint_path, {
                **state, "fingerprint": key, "model": module.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            })
            _write_losses(checkpoint_path.parent / LOSSES_FILE, state["history"])
        distributed.barrier()
    if writer is not None:
        writer.close()
    if state["best_state"] is not None:
        module.load_state_dict(state["best_state"])
    module.eval()
    return TrainingResult(history=state["history"], best_epoch=state["best_epoch"],
                          best_loss=float(state["best_loss"]), stopped_early=state["stopped"],
                          resumed_from=resumed_from, seconds=time.monotonic() - start_time)


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
