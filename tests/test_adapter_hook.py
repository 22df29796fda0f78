"""The start-up hook that registers dinov2clip with clip-retrieval: shipped, installed, lazy.
Runs in every environment (it must cost nothing where clip-retrieval is absent)."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PTH = "dinov2clip_clip_retrieval.pth"


def test_start_up_hook_is_installed_and_lazy():
    code = ("import sys; from clip_retrieval_adapter._hook import _Finder; "
            "print(_Finder in sys.meta_path, 'torch' in sys.modules, 'dinov2clip' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False", "False"]


def test_regular_wheel_ships_the_hook(tmp_path):
    # no build isolation: the installed setuptools and wheel build it, nothing is downloaded
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                    "-w", str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("dinov2clip-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert PTH in names and "clip_retrieval_adapter/_hook.py" in names
    # what runs outside a checkout: `--config tiny`/`reference` by name, and the demo that makes its own images
    assert {"training/configs/tiny.yaml", "training/configs/reference.yaml", "training/demo.py"} <= set(names)
    # test and benchmark tooling (tests/support/: the throwaway mongod, the App driver) is not shipped
    tooling = [n for n in names
               if n.startswith(("tests/", "support/")) or n.rsplit("/", 1)[-1] in ("devdb.py", "devapp.py")]
    assert tooling == []


def test_installed_environment_has_the_hook():
    import sysconfig

    assert (Path(sysconfig.get_paths()["purelib"]) / PTH).is_file(), "install with pip install -e . or pip install ."
