"""``core`` is the old name of :mod:`refusal_lab`, kept as an alias for a while: ``import core.study``
gives the very module ``refusal_lab.study`` (one module object under both names, so classes and
registries are shared), and ``python -m core …`` runs the ``refusal_lab`` CLI. New code imports
``refusal_lab``."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_OLD, _NEW = "core", "refusal_lab"


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``core.X`` and hands out the already imported (or now imported) ``refusal_lab.X`` (the
    import system has no built-in package alias)."""

    def find_spec(self, name, path=None, target=None):
        if name.startswith(_OLD + ".") and name != _OLD + ".__main__":
            return importlib.util.spec_from_loader(name, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(_NEW + spec.name[len(_OLD):])

    def exec_module(self, module) -> None:  # already executed under its real name
        pass


if not any(isinstance(f, _Alias) for f in sys.meta_path):
    sys.meta_path.insert(0, _Alias())
