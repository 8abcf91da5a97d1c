"""verify/ as a library a client can trust (as httpx pins its own): ``__all__`` names every public
name the package holds, sorted, and the exception tree in ``verify.errors`` lists every error."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import types

import verify
from verify.errors import VerifyError


def test_all_is_sorted_and_names_every_public_name():
    public = {name for name, value in vars(verify).items() if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert verify.__all__ == sorted(verify.__all__)
    assert set(verify.__all__) == public


def test_the_exception_tree_lists_every_error():
    errors = {cls.__name__ for info in pkgutil.iter_modules(verify.__path__)
              for _, cls in inspect.getmembers(importlib.import_module(f"verify.{info.name}"), inspect.isclass)
              if issubclass(cls, VerifyError) and cls.__module__.startswith("verify.")}
    assert {"GrammarError", "WrongModelError", "IdentityError"} <= errors
    missing = sorted(name for name in errors if name not in importlib.import_module("verify.errors").__doc__)
    assert not missing, f"verify/errors.py's tree does not list {missing}"
