"""FiftyOne's remote-source hooks (`download_model`, `load_model`), imported by the one-line
`__init__.py` that `registry` writes into the zoo directory (and that the repository's `fiftyone_zoo/`
folder holds for `foz.register_zoo_model_source`)."""
from __future__ import annotations

from pathlib import Path

from dinov2clip.errors import UserError


def download_model(model_name, model_path):
    # The model file is the registration itself; weights are fetched by dinov2clip.load on first use.
    raise UserError(f"{model_name}: its registration file {model_path} is missing; register it again with "
                    "`python -m fiftyone_dinov2clip register-presets` or `... register NAME SOURCE`")


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
