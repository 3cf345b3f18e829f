"""Ships the repository's top-level ``properties/`` inside the built package (``recbole_ilora/properties``), so that a
non-editable install (``pip install .``, a wheel) finds its property files; the metadata is in setup.cfg."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithProperties(build_py):
    def run(self):
        super().run()
        source = Path(__file__).resolve().parent / "properties"
        target = Path(self.build_lib) / "recbole_ilora" / "properties"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))


setup(cmdclass={"build_py": BuildWithProperties})
