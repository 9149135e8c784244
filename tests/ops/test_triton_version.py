"""The Triton range the kernels are tested on is stated once in the code (ops/common/utils.py) and the same in
setup.py's extras; the installed Triton must lie in it (CI runs tests/ops on both ends of it), while a user's Triton
outside it only gets a warning at the first kernel launch."""

import re
from pathlib import Path

import pytest
import triton

from x_transformers.ops.common import utils


def spec():
    (lo_major, lo_minor), (hi_major, hi_minor) = utils.TRITON_TESTED
    return f"triton>={lo_major}.{lo_minor},<{hi_major}.{hi_minor}"


def test_installed_triton_is_in_the_tested_range():
    assert utils.triton_version_tested(triton.__version__), (
        f"Triton {triton.__version__} is outside the tested range ({spec()}): install one within it, or run "
        "tests/ops on this one and widen TRITON_TESTED in x_transformers/ops/common/utils.py and setup.py's extras"
    )


def test_setup_states_the_tested_range():
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    stated = re.findall(r'"(triton *[<>=!~][^"]*)"', setup)
    assert stated and all(s == spec() for s in stated), f"setup.py states {stated}, the code tests {spec()}"
    assert spec() in utils.TRITON_INSTALL


@pytest.mark.parametrize("version, tested", [
    ("3.5.1", False), ("3.6.0", True), ("3.7.1", True), ("3.9.0", True), ("3.10.0", False), ("3.6.0+git1a2b3c", True),
])
def test_range_check(version, tested):
    assert utils.triton_version_tested(version) == tested


def test_untested_triton_warns(monkeypatch):
    monkeypatch.setattr(triton, "__version__", "3.10.0")
    with pytest.warns(RuntimeWarning, match=re.escape(utils.TRITON_INSTALL)):
        utils.check_triton_version()
