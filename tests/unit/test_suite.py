"""The test suite's own machinery, checked so that it cannot silently stop working."""

import os

import pytest


@pytest.mark.xdist_group("suite_check")
def test_xdist_groups_take_effect(request):
  """Under ``pytest -n N --dist loadgroup`` a grouped test is named ``...@group``: that name is
  what keeps the tests of one shared build on one worker. (pytest 9.2 with pytest-xdist 3.8
  drops the rename silently; the test extra pins pytest below 9.2 for that reason.)"""
  if "PYTEST_XDIST_WORKER" not in os.environ or not request.config.getvalue("loadgroup"):
    pytest.skip("not an xdist --dist loadgroup run")
  assert request.node.nodeid.endswith("@suite_check"), request.node.nodeid
