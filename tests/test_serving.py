"""`mtd-serving`: adds warm-up requests to an export; refuses bad flags."""

import json
import pathlib
import shutil

import pytest

from mtd_tf import serving
from mtd_tf.priors import serving_requests

REPO = pathlib.Path(__file__).resolve().parents[1]
EXPORTS = sorted(p.parent for p in REPO.glob("saved_models/*/*/saved_model.pb"))


def test_help_lists_its_own_flags(capsys):
  with pytest.raises(SystemExit) as exit_info:
    serving.run(["mtd-serving", "--help"])
  assert exit_info.value.code == 0
  out = capsys.readouterr().out
  assert "--add_warmup" in out and "--batch_sizes" in out


def test_warmup_command_line(tmp_path, run_tool):
  if not EXPORTS:
    pytest.skip("No saved_models/*/*/saved_model.pb in this checkout.")
  copy = tmp_path / "m" / "1"
  shutil.copytree(
    EXPORTS[0], copy, ignore=shutil.ignore_patterns("assets.extra")
  )
  done = run_tool("mtd_tf.serving", f"--add_warmup={copy}", "--batch_sizes=1,4")
  assert done.returncode == 0, done.stderr
  assert "wrote" in done.stdout
  logs = serving_requests.read_warmup_requests(copy)
  assert [
    int(log.predict_log.request.inputs["x"].tensor_shape.dim[0].size)
    for log in logs
  ] == [1, 4]
  bad = run_tool("mtd_tf.serving", f"--add_warmup={tmp_path / 'missing'}")
  assert bad.returncode == 1
  assert "not a SavedModel" in bad.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
  "args,message",
  [
    ([], "Pass --add_warmup"),
    (["--add_warmup=x", "--batch_sizes=0"], "Batch sizes must be 1.."),
    (["--add_warmup=x", "--batch_sizes=100000000"], "Batch sizes must be 1.."),
    (["--add_warmup=x", "--batch_sizes=a"], "integers"),
  ],
)
def test_bad_flags_are_refused_in_one_line(args, message, run_tool):
  done = run_tool("mtd_tf.serving", *args)
  assert done.returncode == 2, done.stderr
  assert message in done.stderr.strip().splitlines()[-1]
  assert "Traceback" not in done.stderr


def test_a_lying_prior_json_is_refused_before_writing(tmp_path, run_tool):
  """The warm-up writer used to trust prior.json's image_size."""
  gaussian = [p for p in EXPORTS if p.parent.name == "gaussian_fc"]
  if not gaussian:
    pytest.skip("No saved_models/gaussian_fc export in this checkout.")
  copy = tmp_path / "m" / "1"
  shutil.copytree(
    gaussian[0], copy, ignore=shutil.ignore_patterns("assets.extra")
  )
  meta_path = copy / "assets" / "prior.json"
  meta = json.loads(meta_path.read_text())
  meta["image_size"] = 28  # the signature takes 5 x 5 images
  meta.pop("mu", None)
  meta_path.write_text(json.dumps(meta))
  done = run_tool("mtd_tf.serving", f"--add_warmup={copy}", "--batch_sizes=1")
  assert done.returncode == 1, done.stderr
  assert "does not match the signature" in done.stderr.strip().splitlines()[-1]
  assert not (copy / "assets.extra").exists()


def _tree(folder):
  """{relative path: bytes} of every file under folder."""
  return {
    str(p.relative_to(folder)): p.read_bytes()
    for p in sorted(folder.rglob("*"))
    if p.is_file()
  }


@pytest.mark.parametrize(
  "version, kept, match",
  [
    # A finished export: its own warm-up requests (gaussian_fc/1 was the
    # docstring's example, and the tool rewrote its file).
    ("1", (), "has assets.extra/tf_serving_warmup_requests"),
    # Without them it still is one: export_prior wrote its Keras model.
    ("2", ("tf_serving_warmup_requests",), "has assets.extra/score_network"),
  ],
)
def test_a_finished_export_is_never_rewritten(
  tmp_path, run_tool, version, kept, match
):
  source = REPO / "saved_models" / "gaussian_fc" / version
  copy = tmp_path / "gaussian_fc" / version
  shutil.copytree(source, copy, ignore=shutil.ignore_patterns(*kept))
  fresh = tmp_path / "mine" / "1"  # an export of one's own, no warm-up
  shutil.copytree(
    REPO / "saved_models" / "gaussian_fc" / "1",
    fresh,
    ignore=shutil.ignore_patterns("assets.extra"),
  )
  before, before_fresh = _tree(copy), _tree(fresh)
  done = run_tool(
    "mtd_tf.serving",
    f"--add_warmup={fresh}",
    f"--add_warmup={copy}",
    "--batch_sizes=1,4",
  )
  assert done.returncode == 1, done.stderr
  (line,) = done.stderr.strip().splitlines()
  assert line.startswith(f"serving: error: {copy} is a finished export")
  assert match in line and "published versions never change" in line
  assert done.stdout == ""
  # Every folder is checked before any is written.
  assert _tree(copy) == before and _tree(fresh) == before_fresh


def test_a_shipped_prior_is_refused_even_without_warmup(
  tmp_path, run_tool, monkeypatch
):
  from mtd_tf import priors  # pylint: disable=g-import-not-at-top

  root = tmp_path / "saved_models"
  copy = root / "gaussian_fc" / "1"
  shutil.copytree(
    REPO / "saved_models" / "gaussian_fc" / "1",
    copy,
    ignore=shutil.ignore_patterns("assets.extra"),
  )
  monkeypatch.setattr(priors, "shipped_root", lambda: root)
  before = _tree(copy)
  done = run_tool("mtd_tf.serving", f"--add_warmup={copy}")
  assert done.returncode == 1, done.stderr
  assert (
    "is a shipped prior and published versions never change"
    in (done.stderr.strip().splitlines()[-1])
  )
  assert _tree(copy) == before


def test_the_docstring_example_is_no_published_version():
  assert "saved_models/" not in serving.__doc__
  assert "--add_warmup=my_priors/" in serving.__doc__
