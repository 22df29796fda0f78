"""FiftyOne plugin entry (`py_entry` in the repository's fiftyone.yml).

FiftyOne runs this file from its copy in the plugins directory, under a generated module name
(`fiftyone.plugins.orgs.dinov2clip.dinov2clip`) and not as part of this package, so a relative
import fails here. The operators live in the installed package; this file only hands FiftyOne
their `register`."""
from fiftyone_dinov2clip.operators import register

__all__ = ["register"]
