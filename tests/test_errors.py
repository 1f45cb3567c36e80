"""One error root per package: every exception class a package defines derives from its root, so that
a caller above it (the API's handlers, the command line) catches the package's failures by one name."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

from api.errors import ApiError
from api.service_errors import ServiceError
from crm_bridge.errors import BridgeError
from identity.errors import IdentityError
from ledger.errors import LedgerError

ROOTS: dict[str, type[Exception]] = {
    "identity": IdentityError,
    "ledger": LedgerError,
    "crm_bridge": BridgeError,
    "api": ServiceError,
}
# An HTTP answer a route raises, not a failure of the package (see its docstring).
OUTSIDE_THE_ROOT = {ApiError}


def _modules(package: str) -> list[ModuleType]:
    root = importlib.import_module(package)
    return [root] + [
        importlib.import_module(info.name) for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}.")
    ]


def _exceptions(package: str) -> set[type[BaseException]]:
    return {
        cls
        for module in _modules(package)
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__ and issubclass(cls, BaseException)
    }


@pytest.mark.parametrize("package", sorted(ROOTS))
def test_every_exception_a_package_defines_derives_from_its_root(package: str) -> None:
    found = _exceptions(package)
    assert ROOTS[package] in found  # the walk does see the package's errors
    strays = sorted(_name(cls) for cls in found - OUTSIDE_THE_ROOT if not issubclass(cls, ROOTS[package]))
    assert not strays, f"outside {ROOTS[package].__name__}: {strays}"


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def test_the_roots_are_separate() -> None:
    """A package's root is not under another's: catching one package's failures catches no other's."""
    for root in ROOTS.values():
        assert root.__bases__ == (Exception,)
