"""Model architectures: one module each (source, model, adapter), see
:mod:`compresslab.models.architecture`. Every module of this package is imported here, so
a new architecture is one new file (its adapter registers itself) and one model config."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
