"""FiftyOne operators: build a text-searchable similarity index, and sort the App's view by text.

Each `execute` is one call into `brain`; the forms only collect its arguments. `brain` (the zoo model,
fiftyone.brain) is imported when a form opens or an operator runs, not when FiftyOne registers the
plugin in every process that lists operators. A `UserError` is left to propagate: FiftyOne returns its
one line as the run's `error_message`, which the App shows as the failure notice.

FiftyOne's schema validation of a request is turned off (`disable_schema_validation`): a request it finds
invalid (k = 0, an empty query) is raised from the App server as HTTP 500, with no message the App shows.
`execute` checks the values itself, through `brain`, which refuses bad ones with one line."""
from __future__ import annotations

import fiftyone.core.utils as fou
import fiftyone.operators as foo
import fiftyone.operators.types as types
from dinov2clip.errors import UserError

from . import registry, store_poll, warmup
from .index_defaults import AUTO_HELP

DEFAULT_K = 25
BACKENDS = ("auto", "sklearn", "lancedb")  # auto: brain.default_backend (by the dataset's size)
REGISTER_HINT = ("register one with `python -m fiftyone_dinov2clip register-presets` or "
                 "`python -m fiftyone_dinov2clip register NAME SOURCE`, then reopen this form")


def _brain():
    from . import brain

    return brain


def _given(params: dict, *names: str) -> dict:
    """The named params the caller set; absent or empty ones fall back to `brain`'s defaults."""
    return {n: params[n] for n in names if params.get(n) not in (None, "")}


class ComputeSimilarity(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="compute_dinov2clip_similarity",
            label="dinov2clip: compute text-searchable similarity index",
            description="Embed the images with a registered dinov2clip model and index them for text search",
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            disable_schema_validation=True,  # see the module docstring
        )

    def resolve_input(self, ctx):
        brain = _brain()
        inputs = types.Object()
        inputs.view_target(ctx)
        names = registry.registered()
        if names:
            choices = types.Dropdown(label="Model", description="a registered dinov2clip zoo model, name@version")
            for name in names:
                choices.add_choice(name, label=name)
            inputs.str("model", required=True, default=names[-1], view=choices)
        else:
            message = f"no dinov2clip model is registered in {registry.zoo_dir()}: {REGISTER_HINT}"
            inputs.view("no_models", types.Warning(label="No dinov2clip model registered", description=message))
            inputs.str("model", required=True, label="Model", invalid=True, error_message=message)
        inputs.str("brain_key", default=brain.DEFAULT_BRAIN_KEY, label="Brain key",
                   description="the text-searchable similarity index")
        inputs.str("embeddings_field", default=brain.DEFAULT_FIELD, label="Embeddings field",
                   description="sample field for the CLIP-space embeddings")
        inputs.str("dinov2_field", label="DINOv2 field (optional)",
                   description="also store the DINOv2 embeddings, for image-to-image similarity")
        if ctx.params.get("dinov2_field"):
            inputs.str("dinov2_brain_key", label="DINOv2 brain key (optional)",
                       description="also build an image-only index over the DINOv2 field")
        backends = types.Dropdown(label="Backend")
        for b in BACKENDS:
            backends.add_choice(b, label=b, description=AUTO_HELP if b == "auto" else None)
        inputs.enum("backend", backends.values(), default=BACKENDS[0], view=backends)
        inputs.int("batch_size", min=1, label="Batch size", description="empty: the model's default")
        inputs.bool("overwrite", default=False, label="Overwrite",
                    description="replace existing brain runs with these keys")
        return types.Property(inputs, view=types.View(label="dinov2clip similarity index"))

    def execute(self, ctx):
        brain = _brain()
        progress = None
        if ctx.delegated:
            progress = fou.report_progress(lambda pb: ctx.set_progress(progress=pb.progress), dt=5.0)
        params = {**ctx.params, "backend": None if ctx.params.get("backend") == "auto" else ctx.params.get("backend")}
        model = ctx.params.get("model")
        if not isinstance(model, str) or not model:
            raise UserError(f"choose a registered dinov2clip model, not {model!r}")
        results, report = brain.compute_similarity(
            ctx.target_view(), model, progress=progress,
            **_given(params, "brain_key", "embeddings_field", "dinov2_field", "dinov2_brain_key", "backend",
                     "batch_size", "overwrite"))
        if not ctx.delegated:
            ctx.ops.reload_dataset()  # the App learns of the new field and brain run
        return {"brain_key": results.key, "model": results.config.model, "embedded": report.embedded,
                "failed": len(report.failed), "skipped_existing": report.skipped_existing}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("brain_key", label="Brain key")
        outputs.str("model", label="Model")
        outputs.int("embedded", label="Images embedded")
        outputs.int("failed", label="Unreadable images (skipped, see the log)")
        outputs.int("skipped_existing", label="Images that already had embeddings")
        return types.Property(outputs, view=types.View(label="dinov2clip similarity index"))


class TextQuery(foo.Operator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="dinov2clip_text_query",
            label="dinov2clip: sort by text",
            description="Sort the current view by similarity to a text query",
            dynamic=True,
            disable_schema_validation=True,  # see the module docstring
        )

    def resolve_input(self, ctx):
        inputs = types.Object()
        dataset = ctx.dataset
        runs = {}
        for key in dataset.list_brain_runs():
            config = dataset.get_brain_info(key).config
            if getattr(config, "supports_prompts", False):
                runs[key] = getattr(config, "model", None)
        if runs:
            choices = types.Dropdown(label="Similarity index", description="a brain run that takes text")
            for key, model in runs.items():
                choices.add_choice(key, label=key, description=model)
            inputs.str("brain_key", required=True, default=next(iter(runs)), view=choices)
        else:
            message = (f"dataset {dataset.name!r} has no similarity index that takes text: build one with "
                       "the 'dinov2clip: compute text-searchable similarity index' operator or "
                       "`python -m fiftyone_dinov2clip index`")
            inputs.view("no_index", types.Warning(label="No text-searchable index", description=message))
            inputs.str("brain_key", required=True, label="Similarity index", invalid=True, error_message=message)
        inputs.str("query", required=True, label="Text query")
        inputs.int("k", min=1, default=DEFAULT_K, label="Number of results")
        return types.Property(inputs, view=types.View(label="dinov2clip text search"))

    def execute(self, ctx):
        k = ctx.params.get("k")
        view = _brain().sort_by_text(_without_last_similarity_sort(ctx.view), ctx.params.get("query"),
                                     ctx.params.get("brain_key"), DEFAULT_K if k is None else k)
        ctx.ops.set_view(view)
        return {"count": len(view)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("count", label="Results")
        return types.Property(outputs)


def _without_last_similarity_sort(view):
    """A new text query replaces the previous one: a trailing similarity sort is dropped, so the query
    searches the view the user built, not only the last query's top k. The view is rebuilt from its
    serialised stages, the way the App server rebuilds every view (generated views included)."""
    import fiftyone.core.stages as fos
    import fiftyone.core.view as fov

    stages = getattr(view, "_all_stages", [])
    if not stages or not isinstance(stages[-1], fos.SortBySimilarity):
        return view
    return fov.DatasetView._build(view._root_dataset, view._serialize()[:-1])


def register(p):
    p.register(ComputeSimilarity)
    p.register(TextQuery)
    warmup.start()  # App server: torch/open_clip imported while the page loads
    store_poll.apply()  # App server: the search panel learns sooner that a run finished
