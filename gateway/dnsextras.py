"""dnspython's optional extras, answered without loading ``importlib.metadata``.

On import, dnspython asks ``importlib.metadata`` for the versions of the packages behind its
optional extras (``dns._features.have``: DNSSEC, DoH, DoQ, IDNA 2008, trio, WMI). Loading
``importlib.metadata`` brings ``zipfile``, ``csv``, ``tempfile`` and ``importlib.resources``
with it: 2.1 MB of resident memory per gateway process running DNS filters, to learn that
packages which are not installed are not installed.

:func:`defer_package_metadata` runs before the policy's filters are imported. It puts a
stand-in for ``importlib.metadata`` in ``sys.modules`` that loads the real module at the first
attribute asked of it, and a one-shot import hook: right after ``dns._features`` has run (if
a filter imports dnspython at all), each extra one of whose packages no import can find gets
the answer dnspython would reach, "off", through dnspython's own ``dns._features.force``. An
extra whose packages are all present is left to dnspython's version check, which then loads
``importlib.metadata`` as before; so does an entry-point filter (gateway/registry.py).
The stand-in is ``gateway.deferred``'s. ``dns._features``' private table and functions are
checked first (patch ``dnspython.features``, gateway/patches.py): when they are not as read,
nothing is forced (dnspython's own version checks run) and one warning line says so.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from typing import Any

from gateway import patches
from gateway.deferred import defer

METADATA = "importlib.metadata"
FEATURES = "dns._features"


class _FeaturesHook:
    """A ``sys.meta_path`` finder for ``dns._features`` alone, removed at its first use: it
    finds the module the usual way and runs :func:`_force_absent` after the module's code."""

    def find_spec(self, name: str, path: Any = None, target: Any = None
                  ) -> importlib.machinery.ModuleSpec | None:
        if name != FEATURES:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenForce(spec.loader)  # type: ignore[assignment]  # duck-typed
        return spec


class _ThenForce:
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        module: types.ModuleType | None = self.loader.create_module(spec)
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        _force_absent(module)

    def __getattr__(self, attr: str) -> Any:  # get_source and the like, for tracebacks
        return getattr(self.loader, attr)


def defer_package_metadata() -> bool:
    """Set up the above; False (and nothing changed) when either module is already loaded."""
    if FEATURES in sys.modules or not defer(METADATA):
        return False
    sys.meta_path.insert(0, _FeaturesHook())
    return True


def _force_absent(features: Any) -> None:
    patches.install("dnspython.features", lambda: _check_features(features),
                    lambda: _force_each_absent(features))


def _check_features(features: Any) -> str | None:
    """None when dnspython's private feature table and its ``force``/``have`` are as read."""
    requirements = getattr(features, "_requirements", None)
    if not isinstance(requirements, dict) or not all(
            isinstance(k, str) and isinstance(v, list) and all(isinstance(x, str) for x in v)
            for k, v in requirements.items()):
        return "dns._features._requirements is not a dict of package lists"
    for fn, args in (("force", ("feature", "enabled")), ("have", ("feature",))):
        code = getattr(getattr(features, fn, None), "__code__", None)
        if code is None or code.co_varnames[:code.co_argcount] != args:
            return f"dns._features.{fn} is not {fn}({', '.join(args)})"
    return None


def _force_each_absent(features: Any) -> None:
    requirements: dict[str, list[str]] = features._requirements
    for feature, needs in requirements.items():
        packages = [need.split(">=")[0].strip().replace("-", "_") for need in needs]
        if any(_absent(p) for p in packages):
            features.force(feature, False)


def _absent(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True
