"""Runs pytest on the test files named on the command line (for Bazel)."""

import sys

import pytest

if __name__ == "__main__":
  sys.exit(pytest.main(["-q", "-p", "no:cacheprovider"] + sys.argv[1:]))
