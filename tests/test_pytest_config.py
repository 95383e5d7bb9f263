"""The test configuration itself: a deprecated API met by the project's own code fails the suite."""

import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_deprecation_warnings_fail_unless_a_third_party_module_is_named():
    filters = tomllib.loads(PYPROJECT.read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    assert "error::DeprecationWarning" in filters
    ignored = [f.split(":") for f in filters if f.startswith("ignore:") and "DeprecationWarning" in f]
    # action:message:category:module: each ignore names the one third-party module it is about
    assert all(len(f) >= 4 and f[3] and not f[3].startswith(("prep", "train", "benchmarks", "tests")) for f in ignored)
