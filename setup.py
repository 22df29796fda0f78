"""Only here to install `dinov2clip_clip_retrieval.pth` (the clip-retrieval registration hook) into
site-packages, for regular and editable installs alike; all metadata lives in pyproject.toml."""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "dinov2clip_clip_retrieval.pth"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(PTH, str(Path(self.build_lib, PTH)), preserve_mode=0)


cmdclass = {"build_py": BuildPyWithPth}

try:
    from setuptools.command.editable_wheel import editable_wheel
except ImportError:  # setuptools < 64: no PEP 660 editable wheels
    editable_wheel = None

if editable_wheel is not None:
    class EditableWheelWithPth(editable_wheel):
        def _create_wheel_file(self, bdist_wheel):
            from wheel.wheelfile import WheelFile

            wheel_path = super()._create_wheel_file(bdist_wheel)
            with WheelFile(wheel_path, "a") as wheel:
                wheel.write(PTH, PTH)
            return wheel_path

    cmdclass["editable_wheel"] = EditableWheelWithPth

setup(cmdclass=cmdclass)
