"""The FiftyOne zoo model: `TorchImageModel` + `PromptMixin`, thin over `dinov2clip.DinoV2Clip`.

Everything numeric (preprocessing, towers, projector, normalisation) lives in the core; this module
only adapts it to FiftyOne's model protocol:
- images are read by the core's own pipeline from each sample's file (EXIF, 16-bit, CMYK, palette), in
  the DataLoader workers; an unreadable one raises, and FiftyOne's own loops then skip its batch (with
  `skip_failures`, their default), as for every zoo model. dinov2clip's `compute_embeddings` (brain.py)
  reads images with the core's loop instead, which loses only the unreadable image;
- towers load lazily: a process that only embeds prompts (the App server) never loads DINOv2.
"""
from __future__ import annotations

import numpy as np
import torch

import fiftyone.core.models as fom
import fiftyone.utils.torch as fout

import dinov2clip
from dinov2clip.errors import UserError
from dinov2clip.preprocess import Preprocess, PreprocessConfig

CLASSIFIER = "fiftyone.utils.torch.ClassifierOutputProcessor"
# CLIP's learned logit scale saturates at 100 in every OpenAI checkpoint; zero-shot logits use it too.
LOGIT_SCALE = 100.0


class ImageTransform:
    """The core preprocessing for anything FiftyOne hands a model: paths, PIL images, HWC uint8 arrays
    (patch crops) or already-preprocessed tensors."""

    def __init__(self, config: dict):
        self.preprocess = Preprocess(PreprocessConfig.from_dict(config))

    def __call__(self, img):
        if torch.is_tensor(img) and img.ndim == 3 and img.dtype.is_floating_point:
            return img
        if isinstance(img, np.ndarray):
            from PIL import Image

            img = Image.fromarray(img)
        return self.preprocess(img)


class DinoV2ClipGetItem(fout.GetItem):
    """Loads one sample's image with the core pipeline (an unreadable one raises: FiftyOne skips its batch)."""

    def __init__(self, transform: ImageTransform, field_mapping=None):
        self.transform = transform
        super().__init__(field_mapping=field_mapping)

    @property
    def required_keys(self):
        return ["filepath"]

    def __call__(self, d):
        return self.transform(d["filepath"])


class DinoV2ClipModelConfig(fout.TorchImageModelConfig):
    """Configuration of a :class:`DinoV2ClipModel`.

    Args:
        source: what `dinov2clip.load` accepts: a preset name, a model directory or `hf-hub:org/repo`
        zoo_name (None): the registered name this config was loaded under (recorded in runs)
        fingerprint (None): the embedding-space fingerprint recorded at registration; a source whose
            weights changed since then is refused
        batch_size (32): images per forward pass when FiftyOne is not told a batch size
        dtype ("auto"): `auto`, `fp32`, `bf16` or `fp16` (auto = bf16 on CUDA and bf16-capable CPUs)
        query_prefix (""): text put before every prompt (e.g. "a photo of "); the default, none, is what
            the projector was evaluated with
        text_prompt ("a photo of"): zero-shot classification prompt: "<text_prompt> <class>"
        classes (None): class names for zero-shot classification with `apply_model`
    """

    def __init__(self, d):
        d = dict(d)
        if d.get("classes") and not d.get("output_processor_cls"):
            d["output_processor_cls"] = CLASSIFIER
        d.setdefault("ragged_batches", False)
        super().__init__(d)
        self.source = self.parse_string(d, "source")
        self.zoo_name = self.parse_string(d, "zoo_name", default=None)
        self.fingerprint = self.parse_string(d, "fingerprint", default=None)
        self.batch_size = self.parse_int(d, "batch_size", default=32)
        self.dtype = self.parse_string(d, "dtype", default="auto")
        self.query_prefix = self.parse_string(d, "query_prefix", default="")
        self.text_prompt = self.parse_string(d, "text_prompt", default="a photo of")


class DinoV2ClipModel(fout.TorchImageModel, fom.PromptMixin):
    """DINOv2 image embeddings projected into CLIP space, and CLIP text embeddings for prompts.

    `embed_all` returns one L2-normalised vector per image; an unreadable image raises, as FiftyOne expects of
    a zoo model."""

    def __init__(self, config: DinoV2ClipModelConfig):
        self._core = None
        self._text = None  # text tower alone (`text_encoders`), while no full model is loaded
        self._config_cache = None  # the model config, read before any weights load
        super().__init__(config)
        self._text_features = None

    # -- loading --------------------------------------------------------------------------
    # `_load_model`, `_build_transforms` and `_predict_all` (with the `_output_processor` FiftyOne builds from the
    # config) are the hooks TorchImageModel's subclasses override, FiftyOne's own CLIP zoo model among them
    # (fiftyone/utils/clip/zoo.py): the only private names used here.
    def _load_model(self, config):
        # Nothing heavy here: the core model is built on first use, with only the towers it needs.
        return None

    def _build_transforms(self, config):
        # The preprocessing config is part of the embedding space; read it without loading weights.
        return ImageTransform(self.core_config().preprocess), False

    def core_config(self):
        from dinov2clip.factory import resolve_source

        if self._core is not None:
            return self._core.config
        if self._config_cache is None:
            self._config_cache = resolve_source(self.config.source)[0]
        return self._config_cache

    def core(self, image: bool = False, text: bool = False) -> dinov2clip.DinoV2Clip:
        """The core model (projector included), with (at least) the requested towers loaded: one loaded without
        them is loaded again with them (the process keeps the text tower and the weight hashes)."""
        had = self._core
        if had is None or (image and had.image_encoder is None) or (text and had.text_encoder is None):
            image = image or (had is not None and had.image_encoder is not None)
            text = text or (had is not None and had.text_encoder is not None)
            self._core = dinov2clip.load(self.config.source, device=str(self.device), dtype=self.config.dtype,
                                         batch_size=self.config.batch_size, image=image, text=text)
            self._check_fingerprint(self._core.fingerprint)
        return self._core

    def text_encoders(self) -> dinov2clip.Encoders:
        """What a text query needs and no more: CLIP's text tower, without the projector or DINOv2 (the App
        server's case; the core keeps the tower for the process, so a fresh instance per request reuses it)."""
        if self._core is not None:
            return self.core(text=True)
        if self._text is None:
            known = dinov2clip.identity.known_model(self.core_config())
            if known:  # a model directory records its projector's hash
                self._check_fingerprint(known)
            self._text = dinov2clip.load_encoders(self.config.source, device=str(self.device),
                                                  dtype=self.config.dtype, batch_size=self.config.batch_size,
                                                  image=False, text=True)
        return self._text

    def _check_fingerprint(self, got: str):
        want = self.config.fingerprint
        if want and want != got:
            name = self.config.zoo_name or self.config.source
            raise UserError(
                f"{name}: the weights at {self.config.source} changed since it was registered (fingerprint "
                f"{got[:12]}, registered {want[:12]}); register it again under a new version with "
                f"`python -m fiftyone_dinov2clip register NAME {self.config.source}` and recompute its "
                "embeddings, so that one index never mixes two embedding spaces")

    @property
    def fingerprint(self) -> str:
        return self.core().fingerprint

    # -- FiftyOne protocol ----------------------------------------------------------------
    @property
    def has_embeddings(self):
        return True

    @property
    def can_embed_prompts(self):
        return True

    def build_get_item(self, field_mapping=None):
        return DinoV2ClipGetItem(self.transforms, field_mapping=field_mapping)

    def _pixels(self, imgs) -> torch.Tensor:
        """A DataLoader's collated batch as is; paths, PIL images or crops (arrays) preprocessed here."""
        if torch.is_tensor(imgs) and imgs.ndim == 4:
            return imgs
        return torch.stack([self.transforms(img) for img in imgs])

    def embed(self, arg):
        return self.embed_all([arg])[0]

    def embed_all(self, args):
        """Images → float32 [N, D] unit vectors."""
        if not len(args):
            return np.empty((0, self.core_config().embed_dim or 0), np.float32)
        return self.core(image=True).encode_image(self._pixels(args)).numpy()

    def get_embeddings(self):
        raise ValueError("DinoV2ClipModel returns embeddings from embed_all(); it does not cache them")

    @property
    def text_limit(self) -> int:
        """How many characters of a query are read; a longer one is cut there."""
        return self.text_encoders().text_limit

    def embed_prompt(self, prompt):
        return self.embed_prompts([prompt])[0]

    def embed_prompts(self, prompts):
        """Texts → float32 [N, D] unit vectors, in the same space as the image embeddings. A text that encodes
        to a zero or non-finite vector is refused: every index would rank by it arbitrarily (FiftyOne's own
        text search, the App's magnifier included, calls this)."""
        emb = self.text_encoders().encode_text([self.config.query_prefix + p for p in prompts]).numpy()
        bad = ~np.isfinite(emb).all(axis=1) | ~emb.any(axis=1)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UserError(f"the query {prompts[i]!r} encodes to a {'zero' if np.isfinite(emb[i]).all() else 'non-finite'}"
                            " vector, which ranks nothing: check the model")
        return emb

    # -- zero-shot classification ---------------------------------------------------------
    def _get_text_features(self) -> torch.Tensor:
        if not self.classes:
            raise UserError("zero-shot classification needs classes: load the model with classes=[...]")
        if self._text_features is None:
            prompts = [f"{self.config.text_prompt} {c}".strip() for c in self.classes]
            self._text_features = torch.from_numpy(self.embed_prompts(prompts))
        return self._text_features

    def _predict_all(self, imgs):
        if self._output_processor is None:
            raise UserError("this dinov2clip model has no classes: load it with classes=[...] to classify, "
                            "or use compute_embeddings / compute_similarity")
        text = self._get_text_features()
        logits = LOGIT_SCALE * torch.from_numpy(self.embed_all(imgs)) @ text.T
        return self._output_processor(logits, (224, 224), confidence_thresh=self.config.confidence_thresh,
                                      classes=self.config.filter_classes)


def load_model_from_spec(spec: dict, **kwargs) -> DinoV2ClipModel:
    """A registered model's spec (see `registry`) plus user keyword arguments → a model instance."""
    d = {"source": spec["source"], "zoo_name": spec.get("zoo_name"), "fingerprint": spec.get("fingerprint")}
    d.update(kwargs)
    return DinoV2ClipModel(DinoV2ClipModelConfig(d))
