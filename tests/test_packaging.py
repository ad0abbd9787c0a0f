"""One import name, ``dinat``, next to Hugging Face's ``kernels`` from PyPI (issue 18).

The repository's folders kernels/, models/, training/ install as ``dinat.kernels`` etc.; nothing of the
project is a top-level ``kernels`` / ``models`` / ``training``. Each check runs in a fresh interpreter
started in an empty folder, so neither this repository's root nor pytest's ``sys.path`` is in the way.
``pip install -e .[test]`` (``make test``) installs both the project and PyPI's ``kernels``.
"""

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"dinat": "dinat", "kernels": "dinat.kernels", "models": "dinat.models",
                    "training": "dinat.training"}

# Runs in the child: prints what it found as JSON (asserted by the tests, which see the failures).
PROBE = r"""
import importlib.util, json, sys
from pathlib import Path
repo = Path(sys.argv[1])
import kernels as hub                            # PyPI's, even with the checkout on sys.path
import dinat, timm, torch
import dinat.training

@hub.use_kernel_forward_from_hub("DinatProbe")   # its API, used offline
class Doubler(torch.nn.Module):
    def forward(self, x):
        return 2 * x

q = torch.randn(1, 5, 5, 1, 4)
bare = {}
for name in ("models", "training"):
    try:
        __import__(name)
        bare[name] = sys.modules[name].__file__
    except ModuleNotFoundError as err:
        bare[name] = "ModuleNotFoundError: " + str(err)
# The checkout's own source folders (a virtual environment may live inside the repository too: make's .venv).
source = tuple(str(repo / folder) + "/" for folder in ("dinat", "kernels", "models", "training"))
ours = sorted(name for name, module in list(sys.modules.items())
              if (getattr(module, "__file__", None) or "").startswith(source))
print(json.dumps({
    "hf_kernels_file": hub.__file__,
    "hf_layer_name": getattr(Doubler, "kernel_layer_name", None),
    "doubled": Doubler()(torch.ones(2)).tolist(),
    "dinat_kernels_name": dinat.kernels.__name__,
    "dinat_kernels_file": dinat.kernels.__file__,
    "na2d_is_ours": dinat.na2d is dinat.kernels.na2d and dinat.na2d.__module__.startswith("dinat.kernels"),
    "na2d_shape": list(dinat.na2d(q, q, q, 3).shape),
    "timm_module": timm.create_model("dinat_mini", num_classes=3).__class__.__module__,
    "timm_lists": timm.list_models("dinat_s_*")[:1],
    "bare": bare,
    "repo_modules": ours,
}))
"""


def _hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_hf_kernels = pytest.mark.skipif(not _hf_kernels_installed(),
                                      reason="PyPI's `kernels` is not installed (pip install -e '.[test]')")


def _probe(tmp_path, pythonpath):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    done = subprocess.run([sys.executable, "-c", PROBE, str(REPO)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _assert_side_by_side(found):
    assert not Path(found["hf_kernels_file"]).resolve().is_relative_to(REPO / "kernels"), found["hf_kernels_file"]
    assert found["hf_layer_name"] == "DinatProbe" and found["doubled"] == [2.0, 2.0]
    assert found["dinat_kernels_name"] == "dinat.kernels"
    assert Path(found["dinat_kernels_file"]).parent.name == "kernels"
    assert found["na2d_is_ours"] and found["na2d_shape"] == [1, 5, 5, 1, 4]
    assert found["timm_module"] == "dinat.models.dinat" and found["timm_lists"] == ["dinat_s_base"]
    # Exactly one copy of every module: whatever was loaded from the checkout is under ``dinat``.
    assert all(name.startswith("dinat") for name in found["repo_modules"]), \
        found["repo_modules"]


def _assert_bare_names_refused(found):
    for name in ("models", "training"):
        assert found["bare"][name].startswith("ModuleNotFoundError"), (name, found["bare"][name])


@needs_hf_kernels
def test_installed_dinat_next_to_pypi_kernels(tmp_path):
    """The install (editable or wheel): no PYTHONPATH, cwd outside the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('dinat'); "
                            "print(s.origin if s else '')"], cwd=tmp_path, env=env, capture_output=True, text=True)
    if not where.stdout.strip():
        pytest.skip("the project is not installed in this interpreter (make test runs pip install -e '.[test]')")
    found = _probe(tmp_path, None)
    _assert_side_by_side(found)
    _assert_bare_names_refused(found)


@needs_hf_kernels
def test_checkout_on_pythonpath_does_not_shadow_pypi_kernels(tmp_path):
    """A source checkout run as the GPU image runs it (PYTHONPATH=<repo>, no install): the folders are
    importable by their bare names there, and each hands over (dinat/_bare_names.py)."""
    found = _probe(tmp_path, str(REPO))
    _assert_side_by_side(found)
    # With the checkout on the path, a bare `models` finds the folder, which refuses with a message naming
    # `dinat.models` (no other package of that name is installed).
    for name in ("models", "training"):
        assert f"dinat.{name}" in found["bare"][name], found["bare"][name]


def test_pyproject_installs_every_package_folder_under_dinat():
    """A new subpackage folder must be listed in pyproject's packages, or the wheel silently lacks it."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == {package: folder for folder, package in PROJECT_PACKAGES.items()}
    folders = {PROJECT_PACKAGES[init.relative_to(REPO).parts[0]]
               + "".join("." + part for part in init.relative_to(REPO).parts[1:-1])
               for top in PROJECT_PACKAGES for init in (REPO / top).rglob("__init__.py")}
    assert set(config["packages"]) == folders
    assert "dinat.kernels" in config["package-data"]
