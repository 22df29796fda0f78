"""The fit and quality operators as the App runs them (real mongod, the plugin installed as FiftyOne installs
it): a projector fitted to the current view's images, immediately and delegated (scheduled, then run as
`fiftyone delegated launch` would), and the text search quality report stored as a run on the dataset. Bad
input is the run's one-line `error_message`, never an exception."""
import asyncio
import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("fiftyone.zoo", reason="fiftyone is not installed (pip install '.[fiftyone]')")

from test_plugin import PLUGIN, form, plugin, run  # noqa: E402,F401 (plugin: the installed-plugin fixture)

REPO = Path(__file__).resolve().parents[2]
FIT = f"{PLUGIN}/fit_projector"
QUALITY = f"{PLUGIN}/text_search_quality"
SMALL = {"epochs": 2, "hidden_dim": 32, "num_blocks": 1}  # a projector that trains in seconds on CPU


@pytest.fixture(scope="module")
def labelled(plugin, tmp_path_factory):
    """40 synthetic shape images, each labelled by its folder ('red circle', ...) in a Classification field."""
    import fiftyone as fo

    sys.path.insert(0, str(REPO / "tests"))
    from test_fit import shapes_folder

    root = shapes_folder(tmp_path_factory.mktemp("fit-op-images"), 40, seed=11)
    dataset = fo.Dataset(f"fit-op-{os.getpid()}")
    dataset.add_samples([fo.Sample(filepath=str(p), ground_truth=fo.Classification(label=p.parent.name))
                         for p in sorted(root.rglob("*.png"))])
    yield dataset
    dataset.delete()


@pytest.fixture(scope="module")
def fitted(labelled, zoo_tiny, tmp_path_factory):
    """Fitted immediately on the whole dataset, from the registered tiny model by its zoo name."""
    out = tmp_path_factory.mktemp("fit-op") / "model"
    name = f"fitop{os.getpid()}"
    return run(FIT, labelled, model=zoo_tiny, out=str(out), register=name, **SMALL), out, name


def test_plugin_registers_fit_and_quality(plugin):
    import fiftyone.operators as foo

    registry = foo.OperatorRegistry()
    assert [e for e in registry.list_errors() if "dinov2clip" in e] == []
    assert {op.uri for op in registry.list_operators(builtin=False)} >= {FIT, QUALITY}


def test_fit_immediately_writes_and_registers_a_model(fitted):
    import dinov2clip

    from fiftyone_dinov2clip import registry

    result, out, name = fitted
    assert result.error is None, result.error
    assert not result.delegated
    got = result.result
    assert got["model_dir"] == str(out) and (out / "config.json").is_file()
    assert got["images"] == 40 and got["train"] + got["held_out"] == 40 and got["unreadable"] == 0
    assert "agreement@10" in got["quality"] and "rank corr." in got["quality"] and "\n" not in got["quality"]
    assert Path(got["report"]).is_file()
    assert dinov2clip.load(str(out), image=False).projector is not None
    assert got["registered"] == name and got["registered"] in registry.registered()
    assert registry.spec(got["registered"])["source"] == str(out)


def test_fit_delegated_on_the_current_view(labelled, tiny_dir, tmp_path):
    """Scheduled as the App's "Schedule" does, on the App's current view, then run by the delegated service."""
    import dinov2clip
    from fiftyone import ViewField as F
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    view = labelled.match(~F("ground_truth.label").starts_with("blue"))
    out = tmp_path / "model"
    queued = run(FIT, labelled, view=view, delegate=True, view_target="CURRENT_VIEW", model=str(tiny_dir),
                 out=str(out), from_scratch=True, **SMALL)
    assert queued.delegated and queued.error is None, queued.error
    assert not out.exists()  # nothing ran yet
    service = DelegatedOperationService()
    service.execute_operation(service.get(queued.result["id"]))
    done = service.get(queued.result["id"])
    assert done.run_state == ExecutionRunState.COMPLETED, done.result and done.result.error
    assert done.result.result["model_dir"] == str(out)
    assert done.result.result["images"] == len(view) < len(labelled)
    assert done.status.progress == 1.0  # reported through ctx.set_progress
    assert dinov2clip.load(str(out), image=False).projector is not None


def test_large_views_default_to_delegated(labelled, monkeypatch):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import resolve_execution_options

    from fiftyone_dinov2clip import operators

    def options():
        return asyncio.run(resolve_execution_options(foo.OperatorRegistry(), FIT,
                                                     {"dataset_name": labelled.name, "params": {}}))

    small = options()
    assert small.allow_immediate_execution and small.allow_delegated_execution
    assert not small.default_choice_to_delegated
    monkeypatch.setattr(operators, "DELEGATE_AT", len(labelled))
    assert options().default_choice_to_delegated


def test_quality_is_stored_as_a_run(labelled, fitted, tmp_path):
    result, model_dir, _ = fitted
    assert result.error is None, result.error
    out = tmp_path / "quality"
    got = run(QUALITY, labelled, model=str(model_dir), label_field="ground_truth", out=str(out),
              run_key="fitted_quality")
    assert got.error is None, got.error
    assert got.result["run_key"] == "fitted_quality" and got.result["images"] == 40
    assert "zero-shot" in got.result["quality"]  # the label field gave the class prompts
    assert (out / "quality.json").is_file() and (out / "quality.md").is_file()

    labelled.reload()
    assert "fitted_quality" in labelled.list_runs()
    config = labelled.get_run_info("fitted_quality").config
    assert (config.method, config.model, config.label_field) == ("dinov2clip_quality", str(model_dir),
                                                                 "ground_truth")
    stored = labelled.load_run_results("fitted_quality", cache=False)
    assert 0.0 <= stored.report["teacher_agreement@10"] <= 1.0
    assert -1.0 <= stored.report["rank_correlation"] <= 1.0
    assert stored.report["labelled_images"] == 40 and stored.summary == got.result["quality"]

    again = run(QUALITY, labelled, model=str(model_dir), out=str(out), run_key="fitted_quality")
    assert again.error_message.startswith("run key 'fitted_quality' exists on dataset"), again.error_message
    replaced = run(QUALITY, labelled, model=str(model_dir), out=str(out), run_key="fitted_quality", overwrite=True)
    assert replaced.error is None, replaced.error
    assert labelled.get_run_info("fitted_quality").config.label_field is None


def test_quality_form_offers_classification_fields_and_models(labelled, zoo_tiny):
    props = form(QUALITY, labelled)
    assert [c["value"] for c in props["label_field"]["view"]["choices"]] == ["ground_truth"]
    assert zoo_tiny in [c["value"] for c in props["model"]["view"]["choices"]]
    assert props["run_key"]["default"] == "dinov2clip_quality"
    assert zoo_tiny in [c["value"] for c in form(FIT, labelled)["model"]["view"]["choices"]]


@pytest.mark.parametrize("uri, params, message", [
    (FIT, {"epochs": 0}, "epochs must be a whole number, at least 1, not 0"),
    (FIT, {"epochs": 2.5}, "epochs must be a whole number, at least 1, not 2.5"),
    (FIT, {"model": "/no/such/model"}, "model directory not found: /no/such/model"),
    (FIT, {"model": ""}, "choose a dinov2clip model"),
    (FIT, {"out": "{file}"}, "output directory {file} is a file"),
    (FIT, {"out": "relative/model"}, "output directory 'relative/model' must be an absolute path"),
    (FIT, {"register": "bad name"}, "invalid zoo model name 'bad name'"),
    (QUALITY, {"model": "/no/such/model"}, "model directory not found: /no/such/model"),
    (QUALITY, {"label_field": "filepath"}, "field 'filepath' is not a Classification field"),
    (QUALITY, {"run_key": "2nd-run"}, "run key '2nd-run': use letters, digits and _"),
    (QUALITY, {"out": "{file}"}, "output directory {file} is a file"),
])
def test_bad_input_is_one_line(labelled, tiny_dir, tmp_path, uri, params, message):
    file = tmp_path / "a-file"
    file.write_text("not a directory")
    runs = labelled.list_runs()
    good = {"model": str(tiny_dir), "out": str(tmp_path / "out"), **SMALL}
    result = run(uri, labelled, **{**good, **{k: v.format(file=file) if isinstance(v, str) else v
                                              for k, v in params.items()}})
    assert result.error_message.startswith(message.format(file=file)), result.error_message
    assert "\n" not in result.error_message
    assert "UserError" in result.error  # the traceback, for the console
    assert not (tmp_path / "out").exists() and labelled.list_runs() == runs
