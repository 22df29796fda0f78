"""dinov2clip: text search over DINOv2 image embeddings, through a projector into CLIP space."""
from .config import ModelConfig
from .errors import ImageError, UserError
from .factory import attach, from_parts, load
from .model import DinoV2Clip
from .modeldir import bundle, convert_reference, make_tiny
from .presets import DEFAULT_PRESET, PRESETS, list_presets
from .preprocess import Preprocess, PreprocessConfig, load_rgb
from .projector import ProjectorWithResiduals, load_projector

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_PRESET", "PRESETS", "DinoV2Clip", "ImageError", "ModelConfig", "Preprocess", "PreprocessConfig",
    "ProjectorWithResiduals", "UserError", "attach", "bundle", "convert_reference", "from_parts", "list_presets", "load",
    "load_projector", "load_rgb", "make_tiny",
]
