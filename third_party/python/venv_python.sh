#!/bin/sh
# The Python interpreter of this workspace's py_binary/py_test targets
# (registered as a Python toolchain in //:BUILD and WORKSPACE).
#
# The project's dependencies (TensorFlow, ...) live in a virtual environment,
# not in the system python3, so run the first of:
#   $MTD_PYTHON                 (e.g. bazel test --test_env=MTD_PYTHON=/root/venv/bin/python)
#   $VIRTUAL_ENV/bin/python     (an activated venv; .bazelrc passes VIRTUAL_ENV)
#   python3 on PATH
if [ -n "${MTD_PYTHON:-}" ]; then
  py="$MTD_PYTHON"
elif [ -n "${VIRTUAL_ENV:-}" ] && [ -x "${VIRTUAL_ENV}/bin/python" ]; then
  py="${VIRTUAL_ENV}/bin/python"
else
  py=python3
  echo "venv_python.sh: neither MTD_PYTHON nor VIRTUAL_ENV is set; using" \
    "$(command -v python3). If imports fail, run bazel with" \
    "MTD_PYTHON=/path/to/venv/bin/python." >&2
fi
exec "$py" "$@"
