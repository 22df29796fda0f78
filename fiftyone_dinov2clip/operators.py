"""FiftyOne operators: build a text-searchable similarity index, sort the App's view by text, explain its top
hits with heatmaps, fit a projector to the view's images, and judge a model's text search on them against its
CLIP teacher.

Each `execute` is one call into `brain`; the forms only collect its arguments. `brain` (the zoo model,
fiftyone.brain) is imported when a form opens or an operator runs, not when FiftyOne registers the
plugin in every process that lists operators. A `UserError` is left to propagate: FiftyOne returns its
one line as the run's `error_message`, which the App shows as the failure notice.

FiftyOne's schema validation of a request is turned off (`disable_schema_validation`): a request it finds
invalid (k = 0, an empty query) is raised from the App server as HTTP 500, with no message the App shows.
`execute` checks the values itself, through `brain`, which refuses bad ones with one line."""
from __future__ import annotations

from pathlib import Path

import fiftyone.core.utils as fou
import fiftyone.operators as foo
import fiftyone.operators.types as types
from dinov2clip.errors import UserError

from . import registry
from .index_defaults import AUTO_HELP

DEFAULT_K = 25
STORE, LAST_QUERY = "dinov2clip", "last_text_query"  # the dataset's last text query, offered by explain
BACKENDS = ("auto", "sklearn", "lancedb")  # auto: brain.default_backend (by the dataset's size)
REGISTER_HINT = ("register one with `python -m fiftyone_dinov2clip register-presets` or "
                 "`python -m fiftyone_dinov2clip register NAME SOURCE`, then reopen this form")


# Images in the view above which fit and quality forms default to "Schedule": encoding them (and training)
# outlasts what an App request should hold the server for.
DELEGATE_AT = 500
QUALITY_RUN_KEY = "dinov2clip_quality"
QUALITY_METHOD = "dinov2clip_quality"


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
            choices = types.Dropdown(label="Model", description="a registered dinov2clip zoo model")
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
        _text_index_input(inputs, ctx.dataset)
        inputs.str("query", required=True, label="Text query")
        inputs.int("k", min=1, default=DEFAULT_K, label="Number of results")
        return types.Property(inputs, view=types.View(label="dinov2clip text search"))

    def execute(self, ctx):
        k = ctx.params.get("k")
        record = {}
        query, brain_key = ctx.params.get("query"), ctx.params.get("brain_key")
        view = _brain().sort_by_text(_searched_view(ctx), query, brain_key, DEFAULT_K if k is None else k,
                                     record=record)
        ctx.store(STORE).set(LAST_QUERY, {"query": query, "brain_key": brain_key})  # what explain offers next
        ctx.ops.set_view(view)
        return {"count": len(view), **record}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("count", label="Results")
        outputs.int("query_chars", label="Characters of the query read")
        if (ctx.results or {}).get("query_cut"):
            outputs.view("cut", types.Notice(label=f"The query was cut to its first {ctx.results['query_chars']:,} "
                                                   "characters: all the text tower reads"))
        return types.Property(outputs)


class ExplainMatches(foo.Operator):
    """Heatmaps for the top k hits of a text query (the last one sorted by, unless another is typed): only those k
    images are opened. The App then shows the hits, best first, each under its heatmap."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="explain_text_matches",
            label="dinov2clip: explain text matches",
            description="Heatmaps over the top hits of a text query: which parts of each image match it",
            dynamic=True,
            disable_schema_validation=True,  # see the module docstring
        )

    def resolve_input(self, ctx):
        brain = _brain()
        last = _app_text_query(ctx) or ctx.store(STORE).get(LAST_QUERY) or {}
        inputs = types.Object()
        _text_index_input(inputs, ctx.dataset, default=last.get("brain_key"))
        inputs.str("query", required=True, default=last.get("query"), label="Text query",
                   description="the last text query sorted by, or another")
        inputs.int("k", min=1, default=DEFAULT_K, label="Hits to explain",
                   description="heatmaps are computed for these top hits only")
        inputs.str("label_field", default=brain.HEATMAP_FIELD, label="Heatmap field")
        return types.Property(inputs, view=types.View(label="dinov2clip: why did these match?"))

    def execute(self, ctx):
        brain = _brain()
        k = _whole(ctx.params, "k")
        view = _searched_view(ctx)
        report = brain.explain(view, ctx.params.get("query"), DEFAULT_K if k is None else k,
                               **_given(ctx.params, "brain_key", "label_field"))
        ctx.ops.reload_dataset()  # the App learns of the heatmap field
        ctx.ops.set_view(report.view)  # as the text query shows it: a next query replaces this one
        # a field the App did not know when the page loaded is not shown until it is made active. (A sample
        # opened from here, `open_sample`, came up before the App knew the field: the hits are shown instead.)
        label_field = ctx.params.get("label_field") or brain.HEATMAP_FIELD
        ctx.ops.set_active_fields([*(f for f in ctx.active_fields if f != label_field), label_field])
        return {"written": report.written, "unreadable": [p for p, _ in report.failed],
                "query_cut": report.query_cut}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.int("written", label="Heatmaps written")
        outputs.list("unreadable", types.String(), label="Unreadable images (no heatmap)")
        if (ctx.results or {}).get("query_cut"):
            outputs.view("cut", types.Notice(label="The query was cut to what the text tower reads"))
        return types.Property(outputs)


def _text_index_input(inputs, dataset, default: str | None = None) -> None:
    """A choice of the dataset's text-capable brain runs, or a warning that it has none."""
    runs = {}
    for key in dataset.list_brain_runs():
        config = dataset.get_brain_info(key).config
        if getattr(config, "supports_prompts", False):
            runs[key] = getattr(config, "model", None)
    if runs:
        choices = types.Dropdown(label="Similarity index", description="a brain run that takes text")
        for key, model in runs.items():
            choices.add_choice(key, label=key, description=model)
        inputs.str("brain_key", required=True, default=default if default in runs else next(iter(runs)),
                   view=choices)
    else:
        message = (f"dataset {dataset.name!r} has no similarity index that takes text: build one with "
                   "the 'dinov2clip: compute text-searchable similarity index' operator or "
                   "`python -m fiftyone_dinov2clip index`")
        inputs.view("no_index", types.Warning(label="No text-searchable index", description=message))
        inputs.str("brain_key", required=True, label="Similarity index", invalid=True, error_message=message)


def _trailing_sort(ctx) -> dict | None:
    """The request's serialised view stages end in a similarity sort (the App's text search or ours): that
    stage, as the App sent it. None for a saved view, which is searched as it is."""
    import fiftyone.core.stages as fos

    stages = ctx.request_params.get("view") or []
    last = stages[-1] if stages and isinstance(stages[-1], dict) else {}
    if ctx.request_params.get("view_name") or last.get("_cls") != f"{fos.SortBySimilarity.__module__}.SortBySimilarity":
        return None
    return last


def _app_text_query(ctx) -> dict:
    """The text and index the App's current view is sorted by (its own search box), or {}: not for a sort by
    a vector (ours sorts by the query's embedding) or by sample IDs, told apart as FiftyOne's stage does."""
    import fiftyone.core.utils as fou
    from bson import ObjectId

    kwargs = dict(p for p in (_trailing_sort(ctx) or {}).get("kwargs", []) if isinstance(p, list) and len(p) == 2)
    text = kwargs.get("query")
    if not isinstance(text, str) or ObjectId.is_valid(text):
        return {}
    try:
        fou.deserialize_numpy_array(text, ascii=True)
        return {}
    except Exception:  # not a serialised vector: a prompt
        return {"query": text, "brain_key": kwargs.get("brain_key")}


def _searched_view(ctx):
    """The App's view, less a trailing similarity sort: a new text query replaces the previous one rather than
    searching only its top k. Built from the request's own serialised stages, as FiftyOne builds `ctx.view`
    (`fiftyone.server.view.get_view`)."""
    import fiftyone.server.view as fosv

    if _trailing_sort(ctx) is None:
        return ctx.view
    stages = ctx.request_params["view"]
    return fosv.get_view(ctx.dataset, stages=stages[:-1], filters=ctx.request_params.get("filters"),
                         extended_stages=ctx.request_params.get("extended"))


class _LongRunning(foo.Operator):
    """Fit and quality encode every image of the view: both run immediately or delegated, and a large view
    defaults to delegated in the App's execution menu. Subclasses name themselves in NAME, LABEL, DESCRIPTION."""
    NAME = LABEL = DESCRIPTION = ""

    @property
    def config(self):
        return foo.OperatorConfig(
            name=self.NAME,
            label=self.LABEL,
            description=self.DESCRIPTION,
            dynamic=True,
            allow_immediate_execution=True,
            allow_delegated_execution=True,
            disable_schema_validation=True,  # see the module docstring
        )

    def resolve_execution_options(self, ctx):
        from fiftyone.operators.executor import ExecutionOptions

        return ExecutionOptions(allow_immediate_execution=True, allow_delegated_execution=True,
                                default_choice_to_delegated=len(ctx.target_view()) >= DELEGATE_AT)


class FitProjector(_LongRunning):
    NAME = "fit_projector"
    LABEL = "dinov2clip: fit a model to these images"
    DESCRIPTION = ("Fit a dinov2clip projector to the images of the current view (no captions needed) and write "
                   "a model directory")

    def resolve_input(self, ctx):
        inputs = types.Object()
        inputs.view_target(ctx)
        _model_input(inputs, "the encoders, and the projector the fit starts from: a registered zoo model or "
                             "a model directory")
        inputs.str("out", required=True, label="Output directory",
                   description="absolute path of the model directory to write")
        inputs.int("epochs", default=10, min=1, label="Epochs")
        inputs.str("register", label="Register as (optional)",
                   description="also register the fitted model in the FiftyOne zoo under this name")
        inputs.bool("from_scratch", default=False, label="From scratch",
                    description="start from random weights, not the base model's projector")
        inputs.bool("overwrite", default=False, label="Overwrite", description="replace a model already there")
        inputs.int("hidden_dim", min=1, label="Hidden width (optional)", description="empty: training's default")
        inputs.int("num_blocks", min=1, label="Residual blocks (optional)", description="empty: training's default")
        return types.Property(inputs, view=types.View(label=self.LABEL))

    def execute(self, ctx):
        from training.fit import fit
        from training.quality import summary_line

        from . import fitting

        params = ctx.params
        source = _model_source(params.get("model"))
        out = _out_dir(params.get("out"))
        name = params.get("register") or None
        if name is not None:
            registry.check_name(name, free=True)  # a bad or taken name is refused before the fit, not after it
        sizes = {k: _whole(params, k) for k in ("epochs", "hidden_dim", "num_blocks")}
        sizes = {k: v for k, v in sizes.items() if v is not None}
        paths = fitting.image_paths(ctx.target_view())
        if ctx.delegated:  # fit reports no finer progress than its stages
            ctx.set_progress(progress=0.0, label=f"encoding and fitting {len(paths)} images")
        result = fit(paths, source, out, from_scratch=bool(params.get("from_scratch")),
                     overwrite=bool(params.get("overwrite")), progress=ctx.delegated, **sizes)
        registered = registry.register(name, result["model"]) if name else None
        if ctx.delegated:
            ctx.set_progress(progress=1.0, label="done")
        report, counts = result["quality"], result["counts"]
        return {"model_dir": result["model"], "quality": summary_line(report), "registered": registered,
                "images": counts["distinct"], "train": counts["train"], "held_out": counts["val"],
                "unreadable": counts["unreadable"], "selected_epoch": result["selected_epoch"],
                "report": report["files"]["markdown"]}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("model_dir", label="Model directory")
        outputs.str("quality", label="Quality on the held-out images, against the CLIP teacher")
        outputs.str("registered", label="Registered zoo model")
        outputs.int("images", label="Distinct images")
        outputs.int("train", label="Training images")
        outputs.int("held_out", label="Held-out images")
        outputs.int("unreadable", label="Unreadable images (skipped)")
        outputs.int("selected_epoch", label="Selected epoch")
        outputs.str("report", label="Quality report")
        return types.Property(outputs, view=types.View(label="dinov2clip: fitted model"))


class TextSearchQuality(_LongRunning):
    NAME = "text_search_quality"
    LABEL = "dinov2clip: text search quality on these images"
    DESCRIPTION = ("Compare a dinov2clip model's text search with its CLIP teacher's on the images of the current "
                   "view; stored as a run on the dataset")

    def resolve_input(self, ctx):
        import fiftyone as fo

        inputs = types.Object()
        inputs.view_target(ctx)
        _model_input(inputs, "the model to judge: a registered zoo model or a model directory")
        fields = ctx.dataset.get_field_schema(embedded_doc_type=fo.Classification)
        if fields:
            choices = types.Dropdown(label="Label field (optional)",
                                     description="a Classification field: adds zero-shot accuracy and "
                                                 "precision@k, with 'a photo of a {label}' as the prompts")
            for name in fields:
                choices.add_choice(name, label=name)
            inputs.str("label_field", view=choices)
        inputs.str("out", required=True, label="Output directory",
                   description="absolute path where quality.json, quality.md and quality.png go")
        inputs.str("run_key", default=QUALITY_RUN_KEY, label="Run key",
                   description="the report is stored as this run on the dataset")
        inputs.bool("overwrite", default=False, label="Overwrite", description="replace a run with this key")
        return types.Property(inputs, view=types.View(label="dinov2clip: text search quality"))

    def execute(self, ctx):
        from training.fit import quality
        from training.quality import summary_line

        from . import fitting

        params = ctx.params
        source = _model_source(params.get("model"))
        out = _out_dir(params.get("out"))
        key = params.get("run_key") or QUALITY_RUN_KEY
        if not isinstance(key, str) or not key.isidentifier():
            raise UserError(f"run key {key!r}: use letters, digits and _, not starting with a digit")
        if ctx.dataset.has_run(key) and not params.get("overwrite"):
            raise UserError(f"run key {key!r} exists on dataset {ctx.dataset.name!r}: choose another or overwrite")
        view = ctx.target_view()
        field = params.get("label_field") or None
        labels = fitting.labels_of(view, field) if field else None
        paths = fitting.image_paths(view)
        if not paths:
            raise UserError("the view has no images")
        if ctx.delegated:  # quality reports no finer progress than its stages
            ctx.set_progress(progress=0.0, label=f"encoding and scoring {len(paths)} images")
        report = quality(paths, source, out, labels=labels, progress=ctx.delegated)
        # a FiftyOne run: parameters in its config (listed with the dataset), the report in its results
        config = view.init_run(method=QUALITY_METHOD, model=params.get("model"), source=source, label_field=field,
                               out=out, images=report["images"])
        view.register_run(key, config, overwrite=True)
        view.save_run_results(key, view.init_run_results(key, report=report, summary=summary_line(report)))
        if ctx.delegated:
            ctx.set_progress(progress=1.0, label="done")
        return {"run_key": key, "quality": summary_line(report), "images": report["images"],
                "unreadable": report["unreadable"], "report": report["files"]["markdown"]}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("run_key", label="Run key")
        outputs.str("quality", label="Against the CLIP teacher")
        outputs.int("images", label="Images")
        outputs.int("unreadable", label="Unreadable images (skipped)")
        outputs.str("report", label="Report")
        return types.Property(outputs, view=types.View(label="dinov2clip: text search quality"))


def _model_input(inputs, description: str) -> None:
    """Registered zoo models offered by name; a model directory can be typed instead."""
    names = registry.registered()
    choices = types.AutocompleteView(label="Model", description=description, allow_user_input=True)
    for name in names:
        choices.add_choice(name, label=name)
    inputs.str("model", required=True, default=names[-1] if names else None, view=choices)


def _model_source(model) -> str:
    """What training reads: a registered zoo name → the source it was registered from; anything else (a model
    directory, a preset) as given, which training refuses in one line when it cannot load it."""
    if not isinstance(model, str) or not model.strip():
        raise UserError(f"choose a dinov2clip model (a registered zoo model or a model directory), not {model!r}")
    model = model.strip()
    path = Path(model).expanduser()
    if path.exists():
        return str(path.resolve())
    if model.partition("@")[0] in {n.partition("@")[0] for n in registry.registered()}:
        return registry.spec(model)["source"]
    return model


def _out_dir(out) -> str:
    """An absolute path: the App server and a delegated executor run in different working directories."""
    if not isinstance(out, str) or not out.strip():
        raise UserError(f"give an output directory, not {out!r}")
    path = Path(out.strip()).expanduser()
    if not path.is_absolute():
        raise UserError(f"output directory {out!r} must be an absolute path")
    if path.is_file():
        raise UserError(f"output directory {out} is a file: give a directory")
    return str(path)


def _whole(params: dict, name: str) -> int | None:
    """An optional whole number ≥ 1; the App sends numbers as JSON, so 10.0 is 10."""
    value = params.get(name)
    if value in (None, ""):
        return None
    whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
    if not whole or value < 1:
        raise UserError(f"{name} must be a whole number, at least 1, not {value!r}")
    return int(value)


def register(p):
    p.register(ComputeSimilarity)
    p.register(TextQuery)
    p.register(ExplainMatches)
    p.register(FitProjector)
    p.register(TextSearchQuality)
