"""`TrainConfig`: every option of the train stage (`training.train`), with its help text and checks. A module of
its own so that the loop, validation and export all read it without importing one another."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from dinov2clip.errors import UserError

from .losses import CONTRASTIVE_DIRECTIONS

# What may change between an interrupted run and its resumption: how it runs, not what it computes.
RUN_ONLY = ("progress", "resume", "device", "cpu_threads", "resident", "resident_max_gb", "eval_cache")


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


def settings(config: dict) -> dict:
    """What a run computes (a resumed run must have the same): every option of `config` but RUN_ONLY's."""
    return {k: v for k, v in config.items() if k not in RUN_ONLY}
