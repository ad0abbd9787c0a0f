"""What a bare ``import kernels`` / ``models`` / ``training`` means in a source checkout.

With the repository root on ``sys.path`` (``PYTHONPATH=.``, pytest in the repo) the folders are
importable by their bare names too. Loading them that way would make a second copy of every module
(``kernels`` next to ``dinat.kernels``: the ``dinat::`` torch ops registered twice, two timm
registrations) and would hide any installed package of the same name, such as Hugging Face's
``kernels``, which transformers imports. So each folder's ``__init__`` calls ``hand_over`` when it
is imported by its bare name: the installed package of that name takes its place if there is one,
otherwise the import fails with a message that names ``dinat.<name>``.
"""

import importlib
import importlib.machinery
import importlib.util
import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _outside_checkout(entry: str) -> bool:
    return os.path.abspath(entry or os.getcwd()) != _REPO_ROOT


def hand_over(module_globals: dict) -> None:
    """Called by ``<repo>/<name>/__init__.py`` when ``__name__ == name`` (a bare import).

    Puts the installed package called ``name`` into ``sys.modules[name]`` (the import returns that
    one) or raises ``ModuleNotFoundError``. The rest of the calling ``__init__`` then runs with its
    relative imports resolved against ``dinat.<name>``: they bind the one copy, nothing is loaded twice.
    """
    name = module_globals["__name__"]
    spec = importlib.machinery.PathFinder.find_spec(name, [p for p in sys.path if _outside_checkout(p)])
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(
            f"`import {name}` found the {name}/ folder of the DiNAT checkout at {_REPO_ROOT}; it is "
            f"imported as `dinat.{name}` (`import dinat`, `from dinat import {name}`), never by its bare "
            f"name, and no other package called {name!r} is installed", name=name)
    installed = importlib.util.module_from_spec(spec)
    sys.modules[name] = installed
    try:
        spec.loader.exec_module(installed)
    except BaseException:
        del sys.modules[name]
        raise
    one_copy = importlib.import_module(f"dinat.{name}")
    module_globals["__spec__"], module_globals["__package__"] = one_copy.__spec__, one_copy.__name__
