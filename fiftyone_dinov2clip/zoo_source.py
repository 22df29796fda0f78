"""FiftyOne's remote-source hooks (`download_model`, `load_model`), imported by the one-line
`__init__.py` that `registry` writes into the zoo directory (and that the repository's `fiftyone_zoo/`
folder holds for `foz.register_zoo_model_source`)."""
from __future__ import annotations

from pathlib import Path

from dinov2clip.errors import UserError


def download_model(model_name, model_path):
    """Called by FiftyOne when a zoo model's file is missing (`foz.download_zoo_model`, or the first
    `foz.load_zoo_model` of a name from the repository's source, which ships no model files): a preset is
    fetched into a self-contained model directory beside the file (DINOv2, CLIP and projector: it then loads
    offline), and the file names that directory. A registered model's file is its registration: not fetchable."""
    from dinov2clip.identity import known_model
    from dinov2clip.modeldir import bundle, read_config
    from dinov2clip.presets import PRESETS

    from .registry import PRESET_PREFIX, write_spec

    preset = model_name.split("@")[0].removeprefix(PRESET_PREFIX)
    if not model_name.startswith(PRESET_PREFIX) or preset not in PRESETS:
        raise UserError(f"{model_name}: its registration file {model_path} is missing; register it again with "
                        "`python -m fiftyone_dinov2clip register-presets` or `... register NAME SOURCE`")
    folder = bundle(preset, Path(model_path).with_suffix(""), overwrite=True)  # replaces only a model dir
    write_spec(Path(model_path), model_name, str(folder), known_model(read_config(folder)))


def load_model(model_name, model_path, **kwargs):
    """Called by `foz.load_zoo_model(name, **kwargs)` in any process."""
    from .registry import read_spec
    from .zoo import load_model_from_spec

    spec = read_spec(Path(model_path))
    spec.setdefault("zoo_name", model_name)
    source = spec["source"]
    if Path(source).is_absolute() and not Path(source).is_dir():
        from .registry import registered

        raise UserError(f"{model_name}: its model directory {source} is missing (moved or deleted); register it "
                        f"again with `python -m fiftyone_dinov2clip register NAME DIR` (registered: "
                        f"{', '.join(registered())})")
    return load_model_from_spec(spec, **kwargs)
