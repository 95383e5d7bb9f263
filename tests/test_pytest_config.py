"""The test configuration itself: a deprecated API met by the project's own code fails the suite, and passing
tests leave no temporary folders behind."""

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_deprecation_warnings_fail_unless_a_third_party_module_is_named():
    filters = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert "error::DeprecationWarning" in filters
    ignored = [f.split(":") for f in filters if f.startswith("ignore:") and "DeprecationWarning" in f]
    # action:message:category:module: each ignore names the one third-party module it is about
    assert all(len(f) >= 4 and f[3] and not f[3].startswith(("prep", "train", "benchmarks", "tests")) for f in ignored)


def test_passing_tests_leave_no_temporary_folders():
    # pytest keeps every test's tmp_path of the last 3 sessions by default: about 18 GB of checkpoints and
    # shard folders in /tmp after a full run, 54 GB after three.
    options = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]
    assert options["tmp_path_retention_policy"] == "failed"

