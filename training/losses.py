"""Training losses (DESIGN §5): unit-norm MSE to the CLIP image embedding, InfoNCE to the CLIP text
embedding with a learnable temperature, and their weighted sum.

The contrastive loss uses the global batch: features are all-gathered *with gradient*
(`torch.distributed.nn.functional.all_gather`), each rank scores its own rows against every rank's
columns, and DDP's gradient average turns the per-rank means into the global-batch mean — the same
objective as one process holding the whole batch.

`directions="text_to_image"` keeps only the text→image half (each text picks its image among the
batch's images), the direction of text search. Its optimum is the true map from images to texts. The
image→text half (each image picks its text) has as its optimum log p(text|image) − log p(text): when the
texts share a common direction, the −log p(text) term pulls image embeddings off it, which the planted
check measures as lower text→image recall (docs/training.md, *Does the trainer learn?*).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

INIT_TEMPERATURE = 0.07
MAX_LOGIT_SCALE = 100.0


class Trainee(nn.Module):
    """The projector plus, for the contrastive loss, CLIP's learnable log inverse temperature."""

    def __init__(self, projector: nn.Module, contrastive: bool):
        super().__init__()
        self.projector = projector
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / INIT_TEMPERATURE))) if contrastive else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)


def unit_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The reference loss: MSE between the L2-normalised output and the L2-normalised target."""
    return F.mse_loss(F.normalize(pred.float(), dim=-1), F.normalize(target.float(), dim=-1))


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' rows in rank order (gradient flows back to each owner) and this rank's offset."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    import warnings

    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in 2.6+ for a private API; still exact and differentiable
        warnings.simplefilter("ignore", FutureWarning)
        gathered = all_gather(x)
    return torch.cat(gathered, dim=0), dist.get_rank() * x.shape[0]


CONTRASTIVE_DIRECTIONS = ("both", "text_to_image")


def info_nce(pred: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
             directions: str = "both") -> torch.Tensor:
    """InfoNCE of this rank's rows against the global batch (equal local batch sizes): CLIP's symmetric
    loss, or its text→image half only."""
    img = F.normalize(pred.float(), dim=-1)
    txt = F.normalize(text.float(), dim=-1)
    all_img, offset = gather_with_grad(img)
    all_txt, _ = gather_with_grad(txt)
    scale = logit_scale.float().exp().clamp(max=MAX_LOGIT_SCALE)
    labels = torch.arange(img.shape[0], device=img.device) + offset
    text_to_image = F.cross_entropy(scale * txt @ all_img.T, labels)
    if directions == "text_to_image":
        return text_to_image
    return (F.cross_entropy(scale * img @ all_txt.T, labels) + text_to_image) / 2


def combined_loss(pred, clip_image, clip_text, logit_scale, mse_weight: float, contrastive_weight: float,
                  directions: str = "both") -> tuple[torch.Tensor, dict]:
    parts, total = {}, pred.new_zeros((), dtype=torch.float32)
    if mse_weight:
        parts["mse"] = unit_mse(pred, clip_image)
        total = total + mse_weight * parts["mse"]
    if contrastive_weight:
        parts["contrastive"] = info_nce(pred, clip_text, logit_scale, directions)
        total = total + contrastive_weight * parts["contrastive"]
    return total, {k: v.detach() for k, v in parts.items()}
