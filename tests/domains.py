"""Two image domains of coloured shapes and a CLIP teacher that knows their colours: what the domain-shift
test of `fit` needs (a random teacher has no text semantics, so zero-shot accuracy would mean nothing).

Domain A: `training.synthetic.shape_image` (a shape on a dark plain background, 64 px). Domain B: the same
shapes, smaller or larger, on uniform random noise, 96 px. The teacher is the tiny model's CLIP with both
towers trained for a few seconds to tell "a red shape" from "a blue shape" ... on both domains; its DINOv2 is
the tiny random one, its projector random (a fit replaces it)."""
from pathlib import Path

import numpy as np

from training.synthetic import COLOURS, SHAPES, draw_shape, shape_image

CLASSES = [f"{c} shape" for c in COLOURS]
TEACHER_CLIP = {"embed_dim": 32, "quick_gelu": True,
                "vision_cfg": {"image_size": 32, "layers": 1, "width": 48, "patch_size": 8, "head_width": 16,
                               "pool_type": "avg"},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def noisy_shape_image(rng, colour: str, shape: str, size: int = 96):
    from PIL import Image

    noise = Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype(np.uint8))
    return draw_shape(rng, noise, colour, shape, (0.15, 0.3))


def draw(domain: str, rng, colour: str, shape: str):
    return shape_image(rng, colour, shape) if domain == "A" else noisy_shape_image(rng, colour, shape)


def write_domain(root: Path, domain: str, n: int, seed: int) -> Path:
    """n images of a domain in class folders ('red shape/…')."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        folder = root / f"{colour} shape"
        folder.mkdir(parents=True, exist_ok=True)
        draw(domain, rng, colour, SHAPES[rng.integers(len(SHAPES))]).save(folder / f"{domain}{seed}-{i}.png")
    return root


def colour_teacher_model(out: Path, seed: int = 0, n: int = 600, epochs: int = 3) -> Path:
    """A model directory: tiny random DINOv2, a random projector, and a tiny CLIP trained on both domains."""
    import shutil
    import tempfile

    import open_clip
    import torch
    import torch.nn.functional as F
    from open_clip.model import CLIP

    from dinov2clip.clip_text import save_clip
    from dinov2clip.config import ModelConfig, read_config, tensor_sha256
    from dinov2clip.modeldir import make_tiny, save_model_dir
    from dinov2clip.projector import ProjectorWithResiduals

    torch.manual_seed(seed)
    clip = CLIP(**TEACHER_CLIP)
    tokens = open_clip.tokenizer.SimpleTokenizer()([f"a {c}" for c in CLASSES])
    preprocess = open_clip.transform.image_transform(TEACHER_CLIP["vision_cfg"]["image_size"], is_train=False)
    rng = np.random.default_rng(seed)
    labels = rng.integers(len(CLASSES), size=n)
    pixels = torch.stack([preprocess(draw("AB"[i % 2], rng, list(COLOURS)[k], SHAPES[rng.integers(len(SHAPES))]))
                          for i, k in enumerate(labels)])
    labels = torch.from_numpy(labels)
    opt = torch.optim.AdamW(clip.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(epochs):
        for idx in torch.randperm(n).split(64):
            image = F.normalize(clip.encode_image(pixels[idx]), dim=-1)
            text = F.normalize(clip.encode_text(tokens), dim=-1)
            loss = F.cross_entropy(50 * image @ text.T, labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    clip.eval()

    with tempfile.TemporaryDirectory() as tmp:
        base = make_tiny(str(Path(tmp) / "base"), seed=seed)
        config = read_config(base)
        config = ModelConfig.from_dict({**config.to_dict(), "projector": {}, "weights_sha256": {}})
        config.clip = {**config.clip, "origin": f"sha256:{tensor_sha256(clip.state_dict())}",
                       "embed_dim": TEACHER_CLIP["embed_dim"]}
        config.provenance = {"recipe": "colour teacher for the fit domain-shift test", "seed": seed}

        def add_parts(tmp_dir: Path, cfg) -> None:
            shutil.copytree(base / "dinov2", tmp_dir / "dinov2")
            save_clip(clip, TEACHER_CLIP, tmp_dir / "clip")

        projector = ProjectorWithResiduals(config.dinov2["hidden_size"], TEACHER_CLIP["embed_dim"], 64, 2)
        return save_model_dir(config, projector, out, extra=add_parts)
