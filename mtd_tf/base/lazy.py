"""Public names of a package that load on first use (PEP 562).

A package lists `name -> submodule` and gets the module-level `__getattr__`
and `__dir__` that import the submodule when the name is first asked for,
so importing the package loads nothing heavy (no TensorFlow).
"""

import importlib

__all__ = ["package_api"]


def package_api(package, api, modules=None):
  """`__getattr__` and `__dir__` of a package whose names load lazily.

  Args:
    package: the package's name, e.g. "mtd_tf.em".
    api: {public name: submodule name relative to the package}.
    modules: {short name: full module name} served as modules themselves
      (e.g. {"datasets": "mtd_tf.model.datasets"}).

  Returns:
    (`__getattr__`, `__dir__`). A name in neither table that is a submodule
    of the package loads it; anything else is an `AttributeError`.
  """
  modules = dict(modules or {})

  def __getattr__(name):  # noqa: N807
    if name in modules:
      return importlib.import_module(modules[name])
    if name in api:
      return getattr(importlib.import_module(f"{package}.{api[name]}"), name)
    try:  # A submodule not imported yet.
      return importlib.import_module(f"{package}.{name}")
    except ModuleNotFoundError as err:
      if err.name != f"{package}.{name}":
        raise  # the submodule exists but misses a dependency
      raise AttributeError(
        f"module {package!r} has no attribute {name!r}"
      ) from None

  def __dir__():  # noqa: N807
    module = importlib.import_module(package)
    return sorted(set(vars(module)) | set(api) | set(modules))

  return __getattr__, __dir__
