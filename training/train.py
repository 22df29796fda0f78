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

This module is the loop; validation and epoch selection live in `training/validation.py`, the test
evaluation and the model-directory export in `training/export.py`.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dinov2clip.atomic import atomic_path
from dinov2clip.errors import UserError
from dinov2clip.projector import ProjectorWithResiduals

from .data import EmbeddingSet
from .export import finish, write_metrics
from .losses import CONTRASTIVE_DIRECTIONS, MAX_LOGIT_SCALE, Trainee, combined_loss
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


@dataclass
class TrainConfig:
    train: list = field(default_factory=list, metadata={"help": "precomputed training director(ies)"})
    val: list = field(default_factory=list, metadata={"help": "precomputed validation director(ies): held-out pairs"})
    test: list = field(default_factory=list, metadata={"help": "precomputed test director(ies), evaluated once"})
    val_karpathy: list = field(default_factory=list,
                               metadata={"help": "Karpathy caption file(s) (dataset_coco.json...) whose val_split is "
                                                 "evaluated every epoch, each with its val_images root"})
    val_images: list = field(default_factory=list, metadata={"help": "image root of each val_karpathy file"})
    val_split: str = field(default="val", metadata={"help": "Karpathy split evaluated every epoch"})
    select_on: str = field(default="auto", metadata={"help": "what selects the epoch: pairs (held-out pairs), "
                                                             "karpathy (mean over the Karpathy sets), auto: karpathy "
                                                             "when given"})
    eval_cache: str = field(default="", metadata={"help": "embedding cache of the Karpathy sets (default: "
                                                          "eval's, $DINOV2CLIP_CACHE/eval or ~/.cache/dinov2clip/eval)"})
    out: str = field(default="train", metadata={"help": "output directory (checkpoints, metrics, model/)"})
    pooling: str = field(default="mean", metadata={"help": "DINOv2 pooling: mean, cls or cls+mean"})
    hidden_dim: int = field(default=2048, metadata={"help": "projector width"})
    num_blocks: int = field(default=6, metadata={"help": "projector residual blocks"})
    epochs: int = field(default=16, metadata={"help": "training epochs"})
    batch_size: int = field(default=4096, metadata={"help": "global samples per optimizer step"})
    accum_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step (gradient accumulation)"})
    grad_cache: bool = field(default=True, metadata={"help": "with accumulation and the contrastive loss: the "
                                                              "whole batch's negatives via GradCache (one extra "
                                                              "forward); off: each micro-batch's own only"})
    lr: float = field(default=1e-3, metadata={"help": "OneCycleLR peak learning rate"})
    pct_start: float = field(default=0.1, metadata={"help": "OneCycleLR warm-up fraction"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (matrices only)"})
    grad_clip: float = field(default=0.0, metadata={"help": "max gradient norm (0: off)"})
    mse_weight: float = field(default=1.0, metadata={"help": "weight of unit-norm MSE to the CLIP image embedding"})
    contrastive_weight: float = field(default=0.0, metadata={"help": "weight of InfoNCE to the CLIP text embedding"})
    contrastive_directions: str = field(default="both", metadata={"help": "both (CLIP's symmetric InfoNCE) or "
                                                                          "text_to_image (the text-search half "
                                                                          "only; see training/losses.py)"})
    ks: list = field(default_factory=lambda: [1, 5, 10], metadata={"help": "recall@K values"})
    select_metric: str = field(default="mean_recall",
                               metadata={"help": "validation metric that selects the epoch (a recall key or "
                                                 "mean_recall)"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    device: str = field(default="auto", metadata={"help": "cpu, cuda (auto: cuda:LOCAL_RANK when available)"})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads on CPU (0: torch's default); results "
                                                             "are bitwise reproducible for a fixed count"})
    bf16: bool = field(default=True, metadata={"help": "bf16 autocast (GPU only; CPU always fp32)"})
    resident: str = field(default="auto", metadata={"help": "keep all embeddings on the device: auto, yes, no"})
    resident_max_gb: float = field(default=8.0, metadata={"help": "auto: resident when the arrays fit in this"})
    resume: bool = field(default=False, metadata={"help": "continue from checkpoints/last.pt"})
    init: str = field(default="", metadata={"help": "start from this projector (a model directory, .safetensors or "
                                                    ".pt) instead of random weights; its dims replace hidden_dim "
                                                    "and num_blocks"})
    model_source: str = field(default="", metadata={"help": "model directory whose DINOv2/CLIP the output uses "
                                                            "(default: the one recorded by precompute)"})
    recipe: str = field(default="", metadata={"help": "recipe name recorded in provenance"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown train option(s): {', '.join(unknown)}")
        return cls(**d)

    def check(self) -> None:
        if not self.train or not self.val:
            raise UserError("train needs --train DIR and --val DIR (held-out pairs select the epoch)")
        if self.accum_steps < 1 or self.batch_size % self.accum_steps:
            raise UserError(f"batch_size {self.batch_size} is not divisible by accum_steps {self.accum_steps}")
        if not (self.mse_weight or self.contrastive_weight):
            raise UserError("both loss weights are 0: set mse_weight and/or contrastive_weight")
        if self.contrastive_directions not in CONTRASTIVE_DIRECTIONS:
            raise UserError(f"contrastive_directions must be one of {', '.join(CONTRASTIVE_DIRECTIONS)}, got "
                            f"{self.contrastive_directions!r}")
        if self.epochs < 1:
            raise UserError("epochs must be ≥ 1")
        if len(self.val_karpathy) != len(self.val_images):
            raise UserError(f"give one val_images root per val_karpathy file (got {len(self.val_karpathy)} and "
                            f"{len(self.val_images)})")
        if self.select_on not in ("auto", "pairs", "karpathy"):
            raise UserError(f"select_on must be auto, pairs or karpathy, got {self.select_on!r}")
        if self.select_on == "karpathy" and not self.val_karpathy:
            raise UserError("select_on karpathy needs val_karpathy files")

    @property
    def selects_on_karpathy(self) -> bool:
        return bool(self.val_karpathy) and self.select_on != "pairs"


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

# What may change between an interrupted run and its resumption: how it runs, not what it computes.
RUN_ONLY = ("progress", "resume", "device", "cpu_threads", "resident", "resident_max_gb", "eval_cache")


def _settings(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUN_ONLY}


def check_same_encoders(cfg: TrainConfig, train_data: EmbeddingSet) -> None:
    """train, val and test (and an explicit --model-source) must come from one encoder: a projector trained
    on one space and judged or exported on another would be meaningless."""
    from dinov2clip import identity

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
    if cfg.model_source and (got := identity.of_source(cfg.model_source)) != want:
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


def _train(cfg: TrainConfig) -> dict:
    rank, world, device = setup_distributed(cfg.device)
    master = rank == 0
    out = Path(cfg.out)
    ckpt_dir = out / "checkpoints"
    if master:
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
    karpathy = load_karpathy_val(cfg, train_data, device) if master and cfg.val_karpathy else []
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
    history, best, start_epoch = [], None, 0
    if cfg.resume and last.exists():
        state = torch.load(last, map_location="cpu", weights_only=True)
        check_same_config(_settings(json.loads(state["config"])), _settings(cfg.to_dict()), f"{last}",
                          f"choose another --out to train with this config (or remove {out} to start over)")
        if state.get("encoder_fingerprint", train_data.encoder_fingerprint) != train_data.encoder_fingerprint:
            raise UserError(f"{last} was trained on encoders {state['encoder_fingerprint'][:12]}, the --train "
                            f"shards now come from {train_data.encoder_fingerprint[:12]}: choose another --out")
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"], device)
        history, start_epoch = json.loads(state["history"]), int(state["epoch"]) + 1
        best = json.loads(state["best"])
        if master:
            restore_best_checkpoint(ckpt_dir / "best.pt", best, start_epoch, projector)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cfg.bf16 and device.type == "cuda" \
        else contextlib.nullcontext()
    micro = cfg.batch_size // cfg.accum_steps
    local = micro // world
    cached = cfg.grad_cache and cfg.accum_steps > 1 and bool(cfg.contrastive_weight)

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(train_data), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        sums = {"loss": torch.zeros((), dtype=torch.float64)}
        model.train()
        steps = range(steps_per_epoch)
        if cfg.progress and master:
            from tqdm.auto import tqdm
            steps = tqdm(steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for step in steps:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size].numpy()
            # each rank's rows of each micro-batch, sorted: the memmap gather then needs no permutation,
            # and the losses do not depend on the order of rows within a batch
            micro_rows = [np.sort(idx[m * micro:(m + 1) * micro][rank * local:(rank + 1) * local])
                          for m in range(cfg.accum_steps)]
            optimizer.zero_grad(set_to_none=True)
            backward = _cached_backward if cached else _accumulated_backward
            for k, v in backward(model, module, train_data, micro_rows, cfg, autocast).items():
                sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64)) + v
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            if module.logit_scale is not None:
                with torch.no_grad():
                    module.logit_scale.clamp_(0, np.log(MAX_LOGIT_SCALE))
        if world > 1:
            for v in sums.values():
                dist.all_reduce(v)  # gloo and nccl: SUM; divided by world below
        row = {"epoch": epoch + 1, "lr": scheduler.get_last_lr()[0], "seconds": time.perf_counter() - t0,
               "train": {k: float(v) / steps_per_epoch / world for k, v in sums.items()}}
        if module.logit_scale is not None:
            row["temperature"] = float(1 / module.logit_scale.detach().exp())
        row["val"] = evaluate_split(projector, val_data, cfg.ks)
        if karpathy:
            row["val_karpathy"] = {v["name"]: evaluate_features(projector, v, cfg.ks) for v in karpathy}
        history.append(row)
        score = selection_score(row, cfg)
        improved = best is None or score > best["score"]
        if improved:
            best = {"epoch": epoch + 1, "score": score}
        if master:
            # last.pt first: it names the best epoch, and a run killed before best.pt is written rewrites it on
            # resume from last.pt's own weights (the best epoch is then the last one)
            save_checkpoint(last, {"format": CKPT_FORMAT, "model": module.state_dict(),
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "rng": rng_state(device), "epoch": epoch, "config": json.dumps(cfg.to_dict()),
                                   "encoder_fingerprint": train_data.encoder_fingerprint,
                                   "history": json.dumps(history), "best": json.dumps(best)})
            if improved:
                save_checkpoint(ckpt_dir / "best.pt", {"projector": projector.state_dict(), "epoch": epoch + 1})
            write_metrics(out, history, cfg)
            judge = f" (Karpathy {cfg.val_split})" if judged_on_karpathy(row, cfg) else ""
            print(f"epoch {epoch + 1}/{cfg.epochs}  loss {row['train']['loss']:.4f}  val "
                  f"R@{cfg.ks[0]} {row['val'][f'image_retrieval_recall@{cfg.ks[0]}']:.3f}  "
                  f"{cfg.select_metric} {score:.4f}{judge}  ({row['seconds']:.1f}s)", flush=True)
        if world > 1:
            dist.barrier()
    summary = finish(cfg, projector, train_data, val_data, history, best, out, device) if master else {}
    if world > 1:
        dist.barrier()
    return summary
