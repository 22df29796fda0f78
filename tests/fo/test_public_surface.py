"""FiftyOne through its public surface only (issue 21): the installed fiftyone_dinov2clip reads no caller's frame,
replaces no FiftyOne attribute, sniffs no `__main__`, starts no thread, and uses no private name of FiftyOne
outside the hooks FiftyOne's own zoo models override. Read from the package's source, as installed."""
import ast
import inspect
import re
from pathlib import Path

import pytest

pytest.importorskip("fiftyone.utils.torch", reason="fiftyone is not installed (pip install '.[fiftyone]')")

import fiftyone.core.models as fom  # noqa: E402
import fiftyone.utils.torch as fout  # noqa: E402

import fiftyone_dinov2clip  # noqa: E402

PACKAGE = Path(fiftyone_dinov2clip.__file__).parent
FILES = sorted(PACKAGE.glob("*.py"))
# The TorchImageModel hooks FiftyOne's own CLIP zoo model (fiftyone/utils/clip/zoo.py) overrides too.
HOOKS = {"_load_model", "_build_transforms", "_predict_all", "_output_processor"}


def _fiftyone_names(tree: ast.AST) -> set[str]:
    """Names a module binds to FiftyOne modules or objects (`import fiftyone.core.view as fov`, ...)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] == "fiftyone"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fiftyone":
            names |= {a.asname or a.name for a in node.names}
    return names


def offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    fo_names = _fiftyone_names(tree)
    base_private = set(re.findall(r"self\.(_[a-z]\w*)", inspect.getsource(fout.TorchImageModel) +
                                  inspect.getsource(fout.TorchEmbeddingsMixin) + inspect.getsource(fom.PromptMixin)))
    found = []
    for node in ast.walk(tree):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = ast.unparse(node.value)
            if base not in ("self", "cls"):
                found.append(f"{where} private name {base}.{node.attr}")
            elif node.attr in base_private and node.attr not in HOOKS:
                found.append(f"{where} FiftyOne's private self.{node.attr}")
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "fiftyone":
            found += [f"{where} private import {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where} imports {m}" for m in modules if m in ("__main__", "threading")]
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else []
        for t in targets:
            if isinstance(t, ast.Attribute) and ast.unparse(t).split(".")[0] in fo_names:
                found.append(f"{where} replaces FiftyOne's {ast.unparse(t)}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "hasattr") and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant) and str(node.args[1].value).startswith("_"):
            found.append(f"{where} private name {ast.unparse(node.args[0])}.{node.args[1].value} (by string)")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "setattr" and node.args and \
                ast.unparse(node.args[0]).split(".")[0] in fo_names:
            found.append(f"{where} setattr on FiftyOne's {ast.unparse(node.args[0])}")
    return found


def test_the_installed_package_uses_fiftyone_through_its_public_surface():
    assert FILES and all(f.is_file() for f in FILES)
    assert [o for f in FILES for o in offences(f)] == []


@pytest.mark.parametrize("code, offence", [
    ("import sys\nframe = sys._getframe(2)\n", "private name sys._getframe"),
    ("def f(view):\n    return view._root_dataset\n", "private name view._root_dataset"),
    ("def f(v):\n    return v._is_frames or v._all_stages\n", "private name v._is_frames"),
    ("def f(view):\n    return getattr(view, '_all_stages', [])\n", "private name view._all_stages (by string)"),
    ("import fiftyone.core.view as fov\nfov.DatasetView._build(1, 2)\n", "private name fov.DatasetView._build"),
    ("from fiftyone.operators.store import notification_service\nnotification_service.POLL_INTERVAL_SECONDS = 1\n",
     "replaces FiftyOne's notification_service.POLL_INTERVAL_SECONDS"),
    ("import __main__\n", "imports __main__"),
    ("import threading\n", "imports threading"),
    ("class M:\n    def f(self):\n        return self._device\n", "FiftyOne's private self._device"),
    ("class M:\n    def f(self):\n        return self._output_processor\n", None),  # a documented hook
])
def test_the_check_catches_what_the_old_code_did(tmp_path, code, offence):
    path = tmp_path / "module.py"
    path.write_text(code)
    got = offences(path)
    assert (got == []) if offence is None else any(offence in o for o in got), got
