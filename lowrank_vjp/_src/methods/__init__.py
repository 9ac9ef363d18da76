"""Compression methods: one file per method, each a frozen dataclass.

Importing this package imports every module in it, so that each built-in
method is registered under its shorthand (:func:`base.resolve`) without a
list to keep up to date: a new method is one file here plus its test.
"""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
  importlib.import_module(f"{__name__}.{_info.name}")
