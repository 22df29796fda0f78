"""The train stage (DESIGN §5): precomputed embeddings → a trained projector → a model directory.

    python -m training.run train --train pre/train --val pre/val --test pre/test --out run    # one process
    torchrun --nproc_per_node 8 -m training.run train --train pre/train --val pre/val --out run
    torchrun --nnodes 2 --node_rank R --master_addr HOST --nproc_per_node 8 -m training.run train ...

Batch sizes are global: `batch_size` samples per optimizer step, split into `accum_steps` micro-batches,
each split across ranks. The contrastive loss uses the whole global batch as negatives (features
all-gathered with gradient). With `accum_steps > 1` it stays exact through GradCache (Gao et al., 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup"): every micro-batch is embedded
without gradient, the loss over the whole batch gives the gradient of each embedding, then each
micro-batch is embedded again with gradient and that cached gradient is backpropagated — one extra
forward pass, one micro-batch's activations in memory. `--no-grad-cache` instead gives each micro-batch's
loss its own negatives only (`batch_size / accum_steps` samples), which changes the objective. The MSE
objective is per sample: plain accumulation is exact for it.

One epoch = one seeded permutation of the training rows (drop-last). After each epoch: validation
recall@K (and validation loss) on held-out pairs, a checkpoint (`checkpoints/last.pt`: model,
optimizer, scheduler, RNG state as tensors, history — `torch.load(weights_only=True)` reads it) and
metrics.json + metrics.png. The best epoch on validation is exported; test is evaluated once, on it.
Seeded and deterministic on CPU: an interrupted run resumed with `resume=True` ends bitwise equal; a
resume with another config, or on shards of other encoders, is refused.

This module is the loop, read top to bottom: `_set_up` (ranks, data, projector, optimizer, resume) → one
`_train_epoch` and `_end_epoch` (validate, select, checkpoint) per epoch → `_finish`. Its options live in
`training/config.py`, validation and epoch selection in `training/validation.py`, the test evaluation and the
model-directory export in `training/export.py`.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dinov2clip.atomic import atomic_path
from dinov2clip.errors import UserError
from dinov2clip.projector import ProjectorWithResiduals

from .config import TrainConfig, settings
from .data import EmbeddingSet
from .export import finish, write_metrics
from .losses import MAX_LOGIT_SCALE, Trainee, combined_loss
from .rerun import check_same_config
from .validation import (
    evaluate_features,
    evaluate_split,
    judged_on_karpathy,
    load_karpathy_val,
    load_split,
    selection_score,
)

CKPT_FORMAT = "dinov2clip-train/1"


# -- distributed ----------------------------------------------------------------------------------

def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return rank, world, dev


def get_lr_schedule(optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total_steps,
                                               pct_start=cfg.pct_start)


def _param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in module.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in module.named_parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# -- checkpoints ----------------------------------------------------------------------------------

def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: a temporary file renamed over the target."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(),
             "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64))}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def restore_best_checkpoint(path: Path, best: dict, last_epoch: int, projector) -> None:
    """A run killed between writing last.pt and best.pt: best.pt lacks the last epoch, which last.pt names
    as the best, and whose weights `projector` (loaded from last.pt) holds."""
    held = torch.load(path, map_location="cpu", weights_only=True)["epoch"] if path.is_file() else None
    if best["epoch"] != held and best["epoch"] == last_epoch:
        save_checkpoint(path, {"projector": projector.state_dict(), "epoch": best["epoch"]})


# -- what a run starts from ----------------------------------------------------------------------

def check_same_encoders(cfg: TrainConfig, train_data: EmbeddingSet) -> None:
    """train, val and test (and an explicit --model-source) must come from one encoder: a projector trained
    on one space and judged or exported on another would be meaningless."""
    from dinov2clip.factory import towers_of

    from .shards import check_one_encoder, fingerprints

    want = train_data.encoder_fingerprint
    for split, dirs in (("val", cfg.val), ("test", cfg.test)):
        found: dict[str, list[str]] = {}
        for d in dirs:
            for fp, names in fingerprints(d).items():
                found.setdefault(fp, []).extend(names)
        got = check_one_encoder(found, f"--{split} {', '.join(map(str, dirs))}")
        if got and got != want:
            raise UserError(f"--{split} shards come from encoders {got[:12]}, --train shards from {want[:12]}: "
                            "precompute every split with the same model")
    if cfg.model_source and (got := towers_of(cfg.model_source)) != want:
        raise UserError(f"--model-source {cfg.model_source} has encoders {got[:12]}, the training shards "
                        f"{want[:12]}: the exported model would not match its projector")


def initial_projector(cfg: TrainConfig, train_data: EmbeddingSet) -> ProjectorWithResiduals:
    """Random weights (seeded), or `cfg.init`'s, whose input and output must fit the training data."""
    if not cfg.init:
        return ProjectorWithResiduals(train_data.input_dim, train_data.output_dim, cfg.hidden_dim, cfg.num_blocks)
    from dinov2clip.projector import load_projector

    projector = load_projector(cfg.init)
    got = (projector.config.input_dim, projector.config.output_dim)
    if got != (train_data.input_dim, train_data.output_dim):
        raise UserError(f"--init {cfg.init} maps {got[0]}→{got[1]}, the training data {train_data.input_dim}→"
                        f"{train_data.output_dim} ({cfg.pooling} pooling)")
    return projector.float().train()


# -- the loop -------------------------------------------------------------------------------------

def train(cfg: TrainConfig) -> dict:
    """Train, select the best validation epoch, export it as a model directory; returns the summary."""
    cfg.check()
    threads = torch.get_num_threads()
    if cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    owns_group = not (dist.is_available() and dist.is_initialized())
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)
        if owns_group and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _no_sync_unless(model, last: bool):
    """DDP all-reduces gradients on the last micro-batch's backward only."""
    return contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()


def _accumulated_backward(model, module, data, micro_rows, cfg, autocast) -> dict:
    """Plain accumulation: each micro-batch's loss, with its own negatives, backpropagated in turn."""
    n, sums = len(micro_rows), {}
    for m, rows in enumerate(micro_rows):
        x, img, txt = data.batch(rows)
        with _no_sync_unless(model, m == n - 1):
            with autocast:
                pred = model(x)
            loss, parts = combined_loss(pred, img, txt, module.logit_scale, cfg.mse_weight, cfg.contrastive_weight,
                                        cfg.contrastive_directions)
            (loss / n).backward()
        for k, v in {"loss": loss.detach(), **parts}.items():
            sums[k] = sums.get(k, 0) + v.double() / n
    return sums


def _cached_backward(model, module, data, micro_rows, cfg, autocast) -> dict:
    """GradCache: the loss over the whole batch, exact, with one micro-batch's activations held at a time."""
    batches = [data.batch(rows) for rows in micro_rows]
    with torch.no_grad(), autocast:  # 1. embed everything, no graph
        cache = torch.cat([module(x).float() for x, _, _ in batches])
    cache.requires_grad_()
    scale = module.logit_scale.detach().requires_grad_()
    loss, parts = combined_loss(cache, torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches]),
                                scale, cfg.mse_weight, cfg.contrastive_weight, cfg.contrastive_directions)
    loss.backward()  # 2. d loss / d embedding (all-gathered negatives' gradients come back to their rank)
    grads = cache.grad.split([len(b[0]) for b in batches])
    for m, ((x, _, _), grad) in enumerate(zip(batches, grads)):  # 3. embed again with graph, push the grads in
        last = m == len(batches) - 1
        with _no_sync_unless(model, last):
            with autocast:
                pred = model(x)
            surrogate = (pred.float() * grad).sum()
            if last:  # the temperature's gradient, in the synchronised backward so DDP averages it too
                surrogate = surrogate + (module.logit_scale * scale.grad).sum()
            surrogate.backward()
    return {"loss": loss.detach().double(), **{k: v.double() for k, v in parts.items()}}


@dataclass
class Run:
    """One run's state: what `_set_up` builds, each epoch advances and `_finish` exports."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    train_data: EmbeddingSet
    val_data: EmbeddingSet
    karpathy: list
    projector: ProjectorWithResiduals
    module: Trainee
    model: torch.nn.Module  # `module`, wrapped in DDP across ranks
    optimizer: torch.optim.Optimizer
    scheduler: object
    steps_per_epoch: int
    history: list = field(default_factory=list)
    best: dict | None = None
    start_epoch: int = 0

    @property
    def master(self) -> bool:
        return self.rank == 0

    @property
    def ckpt_dir(self) -> Path:
        return Path(self.cfg.out) / "checkpoints"


def _train(cfg: TrainConfig) -> dict:
    run = _set_up(cfg)
    for epoch in range(run.start_epoch, cfg.epochs):
        row = _train_epoch(run, epoch)
        _end_epoch(run, row)
    return _finish(run)


def _set_up(cfg: TrainConfig) -> Run:
    """Ranks, the data, the projector and its optimizer, seeded; resumed from last.pt when asked."""
    rank, world, device = setup_distributed(cfg.device)
    ckpt_dir = Path(cfg.out) / "checkpoints"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.pt"
    if last.exists() and not cfg.resume:
        raise UserError(f"{last} exists: pass --resume to continue it, or choose another --out")
    if cfg.batch_size % (cfg.accum_steps * world):
        raise UserError(f"batch_size {cfg.batch_size} must divide into accum_steps {cfg.accum_steps} × "
                        f"{world} ranks")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)

    train_data = load_split(cfg.train, cfg, device)
    val_data = load_split(cfg.val, cfg, device)
    check_same_encoders(cfg, train_data)
    karpathy = load_karpathy_val(cfg, train_data, device) if rank == 0 and cfg.val_karpathy else []
    steps_per_epoch = len(train_data) // cfg.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"{len(train_data)} training samples is fewer than one batch of {cfg.batch_size}")
    if cfg.contrastive_weight and not train_data.captioned:
        raise UserError(f"{', '.join(map(str, cfg.train))} holds images without captions: the contrastive loss "
                        "needs captions (use mse_weight only)")
    projector = initial_projector(cfg, train_data)
    module = Trainee(projector, contrastive=bool(cfg.contrastive_weight)).to(device)
    ddp_args = {"device_ids": [device]} if device.type == "cuda" else {}
    model = torch.nn.parallel.DistributedDataParallel(module, **ddp_args) if world > 1 else module
    optimizer = torch.optim.AdamW(_param_groups(module, cfg.weight_decay), lr=cfg.lr)
    scheduler = get_lr_schedule(optimizer, cfg, cfg.epochs * steps_per_epoch)
    run = Run(cfg, rank, world, device, train_data, val_data, karpathy, projector, module, model, optimizer,
              scheduler, steps_per_epoch)
    if cfg.resume and last.exists():
        _resume(run, last)
    return run


def _resume(run: Run, last: Path) -> None:
    """Continue from last.pt: refused for another config or shards of other encoders."""
    cfg, fingerprint = run.cfg, run.train_data.encoder_fingerprint
    state = torch.load(last, map_location="cpu", weights_only=True)
    check_same_config(settings(json.loads(state["config"])), settings(cfg.to_dict()), f"{last}",
                      f"choose another --out to train with this config (or remove {cfg.out} to start over)")
    if state.get("encoder_fingerprint", fingerprint) != fingerprint:
        raise UserError(f"{last} was trained on encoders {state['encoder_fingerprint'][:12]}, the --train "
                        f"shards now come from {fingerprint[:12]}: choose another --out")
    run.module.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"], run.device)
    run.history, run.start_epoch = json.loads(state["history"]), int(state["epoch"]) + 1
    run.best = json.loads(state["best"])
    if run.master:
        restore_best_checkpoint(run.ckpt_dir / "best.pt", run.best, run.start_epoch, run.projector)


def _train_epoch(run: Run, epoch: int) -> dict:
    """One seeded permutation of the training rows, step by step; returns the epoch's row of the history
    (its mean training losses, summed over ranks)."""
    cfg, module, data, world = run.cfg, run.module, run.train_data, run.world
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and run.device.type == "cuda" \
        else contextlib.nullcontext()
    micro = cfg.batch_size // cfg.accum_steps
    local = micro // world
    backward = _cached_backward if cfg.grad_cache and cfg.accum_steps > 1 and cfg.contrastive_weight \
        else _accumulated_backward
    t0 = time.perf_counter()
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
    sums = {"loss": torch.zeros((), dtype=torch.float64)}
    run.model.train()
    steps = range(run.steps_per_epoch)
    if cfg.progress and run.master:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
    for step in steps:
        idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size].numpy()
        # each rank's rows of each micro-batch, sorted: the memmap gather then needs no permutation,
        # and the losses do not depend on the order of rows within a batch
        micro_rows = [np.sort(idx[m * micro:(m + 1) * micro][run.rank * local:(run.rank + 1) * local])
                      for m in range(cfg.accum_steps)]
        run.optimizer.zero_grad(set_to_none=True)
        for k, v in backward(run.model, module, data, micro_rows, cfg, autocast).items():
            sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        if module.logit_scale is not None:
            with torch.no_grad():
                module.logit_scale.clamp_(0, np.log(MAX_LOGIT_SCALE))
    if world > 1:
        for v in sums.values():
            dist.all_reduce(v)  # gloo and nccl: SUM; divided by world below
    row = {"epoch": epoch + 1, "lr": run.scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0,
           "train": {k: float(v) / run.steps_per_epoch / world for k, v in sums.items()}}
    if module.logit_scale is not None:
        row["temperature"] = float(1 / module.logit_scale.detach().exp())
    return row


def _end_epoch(run: Run, row: dict) -> None:
    """Validate the epoch, select it if best, and (master) checkpoint it and write the metrics."""
    cfg, projector, epoch = run.cfg, run.projector, row["epoch"] - 1
    row["val"] = evaluate_split(projector, run.val_data, cfg.ks)
    if run.karpathy:
        row["val_karpathy"] = {v["name"]: evaluate_features(projector, v, cfg.ks) for v in run.karpathy}
    run.history.append(row)
    score = selection_score(row, cfg)
    improved = run.best is None or score > run.best["score"]
    if improved:
        run.best = {"epoch": epoch + 1, "score": score}
    if run.master:
        # last.pt first: it names the best epoch, and a run killed before best.pt is written rewrites it on
        # resume from last.pt's own weights (the best epoch is then the last one)
        save_checkpoint(run.ckpt_dir / "last.pt", {
            "format": CKPT_FORMAT, "model": run.module.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "rng": rng_state(run.device), "epoch": epoch,
            "config": json.dumps(cfg.to_dict()), "encoder_fingerprint": run.train_data.encoder_fingerprint,
            "history": json.dumps(run.history), "best": json.dumps(run.best)})
        if improved:
            save_checkpoint(run.ckpt_dir / "best.pt", {"projector": projector.state_dict(), "epoch": epoch + 1})
        write_metrics(Path(cfg.out), run.history, cfg)
        judge = f" (Karpathy {cfg.val_split})" if judged_on_karpathy(row, cfg) else ""
        print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train']['loss']:.4f}  val "
              f"R@{cfg.ks[0]} {row['val'][f'image_retrieval_recall@{cfg.ks[0]}']:.3f}  "
              f"{cfg.select_metric} {score:.4f}{judge}  ({row['seconds']:.1f}s)", flush=True)
    if run.world > 1:
        dist.barrier()


def _finish(run: Run) -> dict:
    """The best epoch tested and exported (master)."""
    summary = finish(run.cfg, run.projector, run.train_data, run.val_data, run.history, run.best,
                     Path(run.cfg.out), run.device) if run.master else {}
    if run.world > 1:
        dist.barrier()
    return summary
