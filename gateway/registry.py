"""Find and build the filter chain a policy names.

A filter class is found, in this order, by: an explicit ``module = "pkg.mod:Class"``; a built-in
module ``filters/<name>.py``; a ``*.py`` file in one of the policy's plugin directories that
defines a class whose ``name`` matches; the ``mailgate.filters`` entry-point group. The hooks a
filter implements are found once, here, at load time.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import FilterLoadError, PolicyError
from gateway.filterapi import ConfigError, Stage, decides, hooks_of, is_local, signs
from gateway.policy.schema import FilterSpec, Policy
from gateway.services import Services
from gateway.settings import did_you_mean

ENTRY_POINT_GROUP = "mailgate.filters"


@dataclass(frozen=True)
class LoadedFilter:
    name: str
    instance: Any
    stages: tuple[Stage, ...]
    requires: tuple[str, ...]
    timeout_s: float
    on_error: str
    origin: str  # where the class came from, for logs and check-policy
    after: tuple[str, ...] = ()  # run after these when they are in the chain (ordering only)
    signs: bool = False  # implements on_sign (runs after the decision, on relayed mail)
    decides: bool = False  # implements on_decided (told the decision, in the background)
    local: bool = False  # declares ``local = True``: run in its stage's coroutine, no task

    @property
    def runs_after(self) -> tuple[str, ...]:
        return self.requires + tuple(a for a in self.after if a not in self.requires)


def _import_attr(spec: str) -> Any:
    mod_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise FilterLoadError(f"cannot import {mod_name}: {e}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise FilterLoadError(f"{mod_name} has no attribute {attr}") from None


def _builtin(name: str) -> Any | None:
    try:
        module = importlib.import_module(f"filters.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"filters.{name}":
            return None
        raise FilterLoadError(f"built-in filter {name}: {e}") from None
    return _class_named(module, name)


def _class_named(module: Any, name: str) -> Any | None:
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if getattr(obj, "name", None) == name and obj.__module__ == module.__name__ \
                and hasattr(obj, "from_config"):
            return obj
    return None


def _load_plugin_file(path: Path) -> Any:
    mod_name = f"mailgate_plugin_{path.stem}_{abs(hash(str(path.resolve()))):x}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, path)
    if spec is None or spec.loader is None:
        raise FilterLoadError(f"cannot load plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[mod_name]
        why = " ".join(str(e).split())  # one line, whatever the exception's text
        raise FilterLoadError(f"plugin file {path}: {type(e).__name__}: {why}") from None
    return module


def _plugin(name: str, dirs: tuple[Path, ...]) -> tuple[Any, str] | None:
    """The class named ``name`` in a plugin file. A file that fails to load does not hide the
    others: its error is raised only when no file has the class, and then the error of the
    file named after the filter (``NAME.py``) if it is one of them, else the first."""
    failed: list[tuple[Path, FilterLoadError]] = []
    for d in dirs:
        for path in sorted(d.glob("*.py")):
            try:
                module = _load_plugin_file(path)
            except FilterLoadError as e:
                failed.append((path, e))
                continue
            cls = _class_named(module, name)
            if cls is not None:
                return cls, f"plugin {path}"
    if failed:
        raise next((e for p, e in failed if p.stem == name), failed[0][1])
    return None


def _entry_point(name: str) -> tuple[Any, str] | None:
    import importlib.metadata  # ~1 MB of modules a gateway on built-in filters never needs

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load(), f"entry point {ep.value}"
            except Exception as e:
                why = " ".join(str(e).split())
                raise FilterLoadError(f"entry point {ep.value}: {type(e).__name__}: {why}") \
                    from None
    return None


def find_filter_class(spec: FilterSpec, plugin_dirs: tuple[Path, ...]) -> tuple[Any, str]:
    if spec.module:
        return _import_attr(spec.module), f"module {spec.module}"
    cls = _builtin(spec.name)
    if cls is not None:
        return cls, f"built-in filters.{spec.name}"
    found = _plugin(spec.name, plugin_dirs) or _entry_point(spec.name)
    if found is None:
        raise FilterLoadError(
            f"no such filter{did_you_mean(spec.name, builtin_names())}: not built in, not in "
            "plugins.dirs, no 'mailgate.filters' entry point (set module = \"pkg.mod:Class\" "
            "for your own)")
    return found


def builtin_names() -> list[str]:
    """The built-in filters' names (the modules of the ``filters`` package)."""
    import filters

    return [m.name for m in pkgutil.iter_modules(filters.__path__) if not m.name.startswith("_")]


def build_chain(policy: Policy, services: Services) -> tuple[LoadedFilter, ...]:
    """Instantiate every enabled filter; all problems are raised as one PolicyError."""
    chain, problems = collect_chain(policy, services)
    if problems:
        raise PolicyError(problems)
    return chain


def collect_chain(policy: Policy, services: Services
                  ) -> tuple[tuple[LoadedFilter, ...], list[str]]:
    """The filters that could be built, and the problems of the others (never raises: a
    third-party ``from_config`` that raises anything becomes a problem)."""
    problems: list[str] = []
    out: list[LoadedFilter] = []
    src = policy.source
    for spec in policy.filters:
        if not spec.enabled:
            continue
        path = f"filters.{spec.name}"
        try:
            cls, origin = find_filter_class(spec, policy.plugin_dirs)
            instance = cls.from_config(dict(spec.settings), services)
        except ConfigError as e:
            problems.extend(f"{src}: {path}.{key}: {reason}" for key, reason in e.every)
            continue
        except FilterLoadError as e:
            problems.append(f"{src}: {path}: {e}")
            continue
        except Exception as e:  # a third-party from_config or module that raised anything
            problems.append(f"{src}: {path}: {type(e).__name__}: {' '.join(str(e).split())}")
            continue
        stages = hooks_of(instance)
        if not stages and not signs(instance) and not decides(instance):
            problems.append(f"{src}: {path}: {origin} implements no hook "
                            f"(on_connect, on_helo, on_mail, on_rcpt, on_message, on_sign, "
                            f"on_decided)")
            continue
        requires = tuple(getattr(instance, "requires", ()) or ())
        after = tuple(getattr(instance, "after", ()) or ())
        out.append(LoadedFilter(spec.name, instance, stages, requires, spec.timeout_s,
                                spec.on_error, origin, after, signs(instance),
                                decides(instance), is_local(instance)))
    names = {f.name for f in out}
    listed = {s.name: s.enabled for s in policy.filters}
    for f in out:
        for r in f.requires:
            if r in names or listed.get(r):  # in the chain, or its own problem is reported
                continue
            why = "its entry has enabled = false" if r in listed else "not in the chain"
            problems.append(f"{src}: filters.{f.name}: requires filter {r!r}, {why}: "
                            f"add it, or remove {f.name!r}")
    problems.extend(f"{src}: filters: {p}" for p in _cycles(out))
    return tuple(out), problems


def _cycles(chain: list[LoadedFilter]) -> list[str]:
    deps: Mapping[str, tuple[str, ...]] = {f.name: f.runs_after for f in chain}
    state: dict[str, int] = {}
    found: list[str] = []

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for d in deps.get(n, ()):
            if state.get(d) == 1:
                found.append("requires cycle: " + " -> ".join([*stack[stack.index(d):], d]))
            elif d in deps and d not in state:
                visit(d, [*stack, d])
        state[n] = 2

    for n in deps:
        if n not in state:
            visit(n, [n])
    return found
