"""The contrastive loss's two forms: CLIP's symmetric InfoNCE and its text→image half."""
import math

import pytest
import torch
import torch.nn.functional as F

from training.losses import info_nce
from support.planted import PlantedMap


def _texts_sharing_a_direction(n=2048, dim=32, seed=0):
    """Image embeddings from a random map (their mean cosine is well above 0) and noisy texts of them."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        image = PlantedMap(8, dim, 32)(torch.randn(n, 8, generator=gen))
    text = F.normalize(image + 0.6 * torch.randn(n, dim, generator=gen) / math.sqrt(dim), dim=-1)
    return image, text


def test_text_to_image_is_the_text_rows_cross_entropy():
    image, text = _texts_sharing_a_direction(n=64)
    scale = torch.tensor(math.log(20.0))
    logits = 20.0 * text @ image.T
    labels = torch.arange(64)
    t2i = F.cross_entropy(logits, labels)
    torch.testing.assert_close(info_nce(image, text, scale, "text_to_image"), t2i)
    torch.testing.assert_close(info_nce(image, text, scale), (t2i + F.cross_entropy(logits.T, labels)) / 2)


def test_image_to_text_half_prefers_leaving_the_common_direction():
    """Why `text_to_image` exists: shifting the true image embeddings away from the texts' mean direction
    lowers the symmetric loss (its image→text half rewards it) but not the text→image loss, whose optimum
    is the true map itself."""
    image, text = _texts_sharing_a_direction()
    mean = F.normalize(image.mean(0), dim=0)
    shifted = F.normalize(image - 0.2 * mean, dim=-1)

    def loss(embedding, directions):  # at its best temperature
        return min(info_nce(embedding, text, torch.tensor(math.log(s)), directions).item() for s in (10, 20, 30, 40, 60))

    assert loss(shifted, "both") < loss(image, "both")
    assert loss(shifted, "text_to_image") > loss(image, "text_to_image")


@pytest.mark.parametrize("directions", ["image_to_text", ""])
def test_unknown_directions_are_a_user_error(directions):
    from training.train import TrainConfig, UserError

    with pytest.raises(UserError, match="contrastive_directions"):
        TrainConfig(train=["t"], val=["v"], contrastive_directions=directions).check()
