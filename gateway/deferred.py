"""Modules put off until first use: a stand-in sits in ``sys.modules`` (and on the parent
package) until something reads an attribute of it; then the real module is imported, takes its
place, and answers.

For imports a library makes eagerly and most gateways never use: dnspython's
``importlib.metadata`` (gateway/dnsextras.py) and dkimpy's ``nacl.signing`` (PyNaCl, for
ed25519 keys only: 1.2 MB of resident memory per process, libsodium included, where nearly all
signatures are RSA). The import statement itself succeeds at once, so a library's
``try: import x / except ImportError`` sees the module as present: :func:`defer` therefore
puts a stand-in only for a module the import system can find.
(``importlib.util.LazyLoader`` cannot serve: on 3.11 the import statement itself reads the
lazy module's ``__spec__``, which loads it.)
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any


class Deferred(types.ModuleType):
    """In ``sys.modules`` for a module not loaded yet: the first attribute it lacks loads the
    real module (which takes its place there and on the parent package) and is read from it."""

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # the import system's probes (__path__, __file__, ...)
            raise AttributeError(attr)
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attr)


def defer(name: str) -> bool:
    """Put a stand-in for the module ``name`` in place (its parent package, if any, is
    imported now). False, and nothing changed, when it is loaded already or cannot be found."""
    if name in sys.modules:
        return False
    try:
        if importlib.util.find_spec(name) is None:
            return False
    except (ImportError, ValueError):
        return False
    if name in sys.modules:  # the parent's import loaded it
        return False
    stand_in = Deferred(name)
    sys.modules[name] = stand_in
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, stand_in)  # what ``import parent.child`` binds
    return True
