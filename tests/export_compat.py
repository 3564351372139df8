"""Until priors.export_prior takes (model, model_dir, metadata, *, version,
overwrite), give it that signature over today's (model, export_dir, metadata,
overwrite) so the trainer tests run in this branch. After the merge of the
new export_prior `install()` does nothing; then delete this file.
"""

import inspect
import os
import sys

from mtd_tf import priors

# Runs a trainer tool with the shim: python -c RUN_TOOL <module> <flags...>.
RUN_TOOL = (
    "import importlib, sys\n"
    f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\n"
    "import export_compat\n"
    "export_compat.install()\n"
    "tool = importlib.import_module(sys.argv[1])\n"
    "tool.run([sys.argv[1].rsplit('.', 1)[-1]] + sys.argv[2:])\n")


def tool_command(module, *flags):
  """The argv that runs `module`'s tool with the shim installed."""
  return [sys.executable, "-c", RUN_TOOL, module, *flags]


def install():
  if "version" in inspect.signature(priors.export_prior).parameters:
    return
  old = priors.export_prior

  def export_prior(model, model_dir, metadata, *, version=None,
                   overwrite=False):
    if version is None:
      existing = ([int(d) for d in os.listdir(model_dir) if d.isdigit()]
                  if os.path.isdir(model_dir) else [])
      version = max(existing, default=0) + 1
    return old(model, os.path.join(model_dir, str(version)), metadata,
               overwrite=overwrite)
  priors.export_prior = export_prior
