"""The FiftyOne plugin as FiftyOne loads it: installed by `fiftyone plugins download` from an archive of
the repository (served on 127.0.0.1; GitHub serves the same zip), listed by the `fiftyone` CLI, and run
through FiftyOne's operator executor — `execute_or_delegate_operator` is what the App server's
`POST /operators/execute` calls, `resolve_type` what it calls to draw a form."""
import asyncio
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PLUGIN = "@dinov2clip/dinov2clip"
COMPUTE = f"{PLUGIN}/compute_dinov2clip_similarity"
QUERY = f"{PLUGIN}/dinov2clip_text_query"
OPERATORS = (COMPUTE, QUERY, f"{PLUGIN}/explain_text_matches")


CLI = """import sys
from fiftyone.core.cli import main
for command in sys.argv[1:]:
    sys.argv = ["fiftyone", *command.split()]
    main()
    print("\\f", flush=True)
"""


def fiftyone_cli(*commands: str) -> list[str]:
    """Outputs of `fiftyone <command>` each, in one fresh process with this session's env, through the
    console script's own entry point (one process: importing fiftyone and torch is most of the time)."""
    proc = subprocess.run([sys.executable, "-c", CLI, *commands], capture_output=True, text=True, timeout=120,
                          env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    outputs = proc.stdout.split("\f\n")
    assert len(outputs) == len(commands) + 1, proc.stdout
    return outputs[:-1]


def run(uri: str, dataset, view=None, delegate: bool = False, **params):
    """The ExecutionResult of one run, as the App server gets it (error_message = the App's notice)."""
    from fiftyone.operators.executor import execute_or_delegate_operator

    request = {"dataset_name": dataset.name, "view": view._serialize() if view is not None else None,
               "params": params, "request_delegation": delegate}
    return asyncio.run(execute_or_delegate_operator(uri, request))


def form(uri: str, dataset, view=None, **params) -> dict:
    """The input form as JSON, as the App receives it (with the App's current `view`, if given)."""
    import fiftyone.operators as foo
    from fiftyone.operators.executor import resolve_type

    request = {"dataset_name": dataset.name, "params": params, **({"view": view._serialize()} if view else {})}
    prop = asyncio.run(resolve_type(foo.OperatorRegistry(), uri, request))
    return prop.to_json()["type"]["properties"]


def repo_archive(path: Path) -> Path:
    """The repository as GitHub's archive lays it out: one top folder, fiftyone.yml at its root."""
    with zipfile.ZipFile(path, "w") as z:
        for rel in ["fiftyone.yml", "README.md", "pyproject.toml"]:
            z.write(REPO / rel, f"dinov2clip-main/{rel}")
        for sub in ["fiftyone_dinov2clip", "fiftyone_zoo", "dinov2clip"]:
            for f in sorted((REPO / sub).rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    z.write(f, f"dinov2clip-main/{f.relative_to(REPO)}")
    return path


@pytest.fixture(scope="module")
def plugin(mongod, tmp_path_factory):
    www = tmp_path_factory.mktemp("www")
    repo_archive(www / "dinov2clip-main.zip")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        fiftyone_cli(f"plugins download http://127.0.0.1:{server.server_address[1]}/dinov2clip-main.zip")
    finally:
        server.shutdown()
    dest = [d for d in Path(os.environ["FIFTYONE_PLUGINS_DIR"]).rglob("fiftyone.yml")]
    assert len(dest) == 1, dest
    assert (dest[0].parent / "fiftyone_dinov2clip" / "plugin.py").is_file()
    assert not (dest[0].parent / "__init__.py").exists()
    yield dest[0].parent
    shutil.rmtree(dest[0].parent)


@pytest.fixture(scope="module")
def indexed(plugin, zoo_tiny, image_folder):
    """Seven images and a corrupt one, indexed through the compute operator (with a DINOv2 field and index)."""
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=str(p)) for p in sorted(image_folder.iterdir())])
    result = run(COMPUTE, dataset, model=zoo_tiny, batch_size=3, dinov2_field="dino", dinov2_brain_key="dino_sim")
    yield dataset, result
    dataset.delete()


def test_cli_lists_plugin_and_enabled_operators(plugin):
    operators, plugins = fiftyone_cli("operators list --enabled --no-builtins", "plugins list")
    enabled = {line.split()[0] for line in operators.splitlines() if line.startswith("@")}
    assert set(OPERATORS) <= enabled, f"not listed as enabled; enabled: {sorted(enabled)}"
    assert PLUGIN in [line.split()[0] for line in plugins.splitlines() if line.startswith("@")]


def test_plugin_registers_without_errors(plugin):
    import fiftyone.operators as foo

    registry = foo.OperatorRegistry()
    assert [e for e in registry.list_errors() if "dinov2clip" in e] == []
    assert {op.uri for op in registry.list_operators(builtin=False)} >= set(OPERATORS)


def test_compute_operator_builds_text_index(indexed, zoo_tiny):
    dataset, result = indexed
    assert result.error is None, result.error
    assert result.result == {"brain_key": "dinov2clip", "model": zoo_tiny, "embedded": 7, "failed": 1,
                             "skipped_existing": 0}
    assert [r["operator_uri"] for r in result.executor.to_json()["requests"]] == ["reload_dataset"]
    dataset.reload()
    assert set(dataset.list_brain_runs()) == {"dinov2clip", "dino_sim"}
    config = dataset.get_brain_info("dinov2clip").config
    assert (config.model, config.supports_prompts, config.embeddings_field) == (zoo_tiny, True, "dinov2clip")
    assert not dataset.get_brain_info("dino_sim").config.supports_prompts
    by_name = {Path(p).name: (e, d) for p, e, d in zip(*dataset.values(["filepath", "dinov2clip", "dino"]))}
    assert by_name.pop("corrupt.jpg") == (None, None)
    assert len(by_name) == 7 and all(e is not None and d is not None for e, d in by_name.values())


def test_compute_operator_delegated_on_current_view(plugin, zoo_tiny, image_folder):
    """Scheduled as the App's "Schedule" does, on the App's current view, then run as
    `fiftyone delegated launch` would."""
    import fiftyone as fo
    from fiftyone import ViewField as F
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=str(image_folder / n)) for n in ("img0.jpg", "img1.png", "corrupt.jpg")])
    view = dataset.match(~F("filepath").ends_with("img1.png"))
    try:
        queued = run(COMPUTE, dataset, view=view, delegate=True, model=zoo_tiny, view_target="CURRENT_VIEW")
        assert queued.delegated and queued.error is None, queued.error
        assert dataset.list_brain_runs() == []  # nothing ran yet
        service = DelegatedOperationService()
        service.execute_operation(service.get(queued.result["id"]))
        done = service.get(queued.result["id"])
        assert done.run_state == ExecutionRunState.COMPLETED, done.result and done.result.error
        assert done.result.result == {"brain_key": "dinov2clip", "model": zoo_tiny, "embedded": 1, "failed": 1,
                                      "skipped_existing": 0}
        assert dataset.get_brain_info("dinov2clip").config.supports_prompts
        assert [Path(p).name for p in dataset.exists("dinov2clip").values("filepath")] == ["img0.jpg"]
    finally:
        dataset.delete()


def test_compute_form_offers_registered_models(plugin, indexed, zoo_tiny):
    from fiftyone_dinov2clip import registry

    props = form(COMPUTE, indexed[0])
    names = registry.registered()  # other test modules register more in this session's zoo
    assert zoo_tiny in names and [c["value"] for c in props["model"]["view"]["choices"]] == names
    assert props["model"]["default"] == names[-1] and not props["model"]["invalid"]
    assert "dinov2_brain_key" not in props  # offered once a DINOv2 field is named
    assert "dinov2_brain_key" in form(COMPUTE, indexed[0], dinov2_field="dino")


def test_compute_form_without_registered_models(plugin, indexed, zoo_tiny, monkeypatch):
    from fiftyone.operators.executor import ExecutionError

    from fiftyone_dinov2clip import registry

    monkeypatch.setattr(registry, "registered", lambda root=None: [])
    props = form(COMPUTE, indexed[0])
    assert props["no_models"]["view"]["name"] == "Warning"
    assert "python -m fiftyone_dinov2clip register-presets" in props["no_models"]["view"]["description"]
    assert props["model"]["invalid"]
    with pytest.raises(ExecutionError, match=r"Path: model\. Reason: no dinov2clip model is registered .*"
                       "register-presets"):  # the executor refuses the form before running anything
        run(COMPUTE, indexed[0], model=zoo_tiny, brain_key="never")
    assert "never" not in indexed[0].list_brain_runs()


def test_text_query_operator_sets_sorted_view(indexed):
    import fiftyone.server.view as fosv
    from bson import json_util

    from fiftyone_dinov2clip import brain

    dataset = indexed[0]
    props = form(QUERY, dataset)
    assert [c["value"] for c in props["brain_key"]["view"]["choices"]] == ["dinov2clip"]  # not dino_sim
    assert props["k"]["default"] == 25

    for k, expected_count in ((3, 3), (None, 7)):
        params = {"brain_key": "dinov2clip", "query": "a photo of a dog"} | ({"k": k} if k else {})
        result = run(QUERY, dataset, **params)
        assert result.error is None, result.error
        assert result.result == {"count": expected_count, "query_chars": 16, "query_cut": False}
        (request,) = result.executor.to_json()["requests"]
        assert request["operator_uri"] == "set_view"
        # the App sends the stages back; the server parses them as extended JSON (its BSONArray scalar)
        shown = fosv.get_view(dataset.name, stages=json_util.loads(json.dumps(request["params"]["view"])))
        expected = brain.sort_by_text(dataset.view(), "a photo of a dog", "dinov2clip", k or 25)
        assert shown.values("id") == expected.values("id")
        assert len(shown.values("id")) == expected_count


def test_a_query_longer_than_the_text_tower_reads_says_where_it_was_cut(indexed):
    from fiftyone_dinov2clip import brain

    dataset = indexed[0]
    long = "a photo of a dog " * 1000  # 17,000 characters
    result = run(QUERY, dataset, brain_key="dinov2clip", query=long, k=3)
    assert result.error is None, result.error
    limit = 32 * 77  # TEXT_CHARS_PER_TOKEN × CLIP's context length
    assert result.result == {"count": 3, "query_chars": limit, "query_cut": True}
    assert brain.sort_by_text(dataset.view(), long[:limit], "dinov2clip", 3).values("id") == \
        brain.sort_by_text(dataset.view(), long, "dinov2clip", 3).values("id")


def test_second_text_query_replaces_the_first(indexed):
    """A second query from the first one's top-3 view searches the user's own view again (here: the dataset
    without the best cat match), not only those 3 — and keeps the user's own stage."""
    import fiftyone.server.view as fosv
    from bson import json_util

    from fiftyone_dinov2clip import brain

    dataset = indexed[0]
    best_cat = brain.sort_by_text(dataset.view(), "a photo of a cat", "dinov2clip", 1).first().id
    users_view = dataset.exclude([best_cat])
    first = brain.sort_by_text(users_view, "a photo of a dog", "dinov2clip", 3)
    result = run(QUERY, dataset, view=first, brain_key="dinov2clip", query="a photo of a cat")
    assert result.error is None, result.error
    expected = brain.sort_by_text(users_view, "a photo of a cat", "dinov2clip", 25).values("id")
    assert result.result["count"] == len(expected) and len(expected) > 3
    (request,) = result.executor.to_json()["requests"]
    shown = fosv.get_view(dataset.name, stages=json_util.loads(json.dumps(request["params"]["view"])))
    assert shown.values("id") == expected
    assert best_cat not in expected


def test_text_query_form_without_text_index(plugin):
    import fiftyone as fo

    dataset = fo.Dataset()
    try:
        props = form(QUERY, dataset)
        assert props["no_index"]["view"]["name"] == "Warning"
        assert "compute text-searchable similarity index" in props["no_index"]["view"]["description"]
        assert props["brain_key"]["invalid"]
    finally:
        dataset.delete()


@pytest.mark.parametrize("uri, params, message", [
    (COMPUTE, {"model": "nope"}, "unknown dinov2clip zoo model 'nope' (registered: {registered}); register one"),
    (COMPUTE, {"model": "{zoo_tiny}"}, "brain key 'dinov2clip' exists on dataset '{dataset}': pass overwrite=True"),
    (QUERY, {"brain_key": "dino_sim", "query": "a dog"}, "brain run 'dino_sim' was computed without a text-capable"),
    (QUERY, {"brain_key": "missing", "query": "a dog"}, "dataset '{dataset}' has no brain run 'missing'; compute one"),
])
def test_user_errors_are_the_run_error_message(indexed, zoo_tiny, uri, params, message):
    from fiftyone_dinov2clip import registry

    dataset = indexed[0]
    runs = set(dataset.list_brain_runs())
    result = run(uri, dataset, **{k: v.format(zoo_tiny=zoo_tiny) for k, v in params.items()})
    expected = message.format(registered=", ".join(registry.registered()), dataset=dataset.name)
    assert zoo_tiny in expected or "{registered}" not in message
    assert result.error_message.startswith(expected), result.error_message
    assert "\n" not in result.error_message
    assert "UserError" in result.error  # the traceback, for the console
    assert set(dataset.list_brain_runs()) == runs


def test_execute_operator_raises_with_the_message(indexed):
    import fiftyone.operators as foo
    from fiftyone.operators.executor import ExecutionError

    with pytest.raises(ExecutionError, match=r"unknown dinov2clip zoo model 'nope' \(registered: "):
        foo.execute_operator(COMPUTE, ctx={"dataset": indexed[0].name, "params": {"model": "nope"}})
