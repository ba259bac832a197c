"""`make test` runs the suite under xdist with --dist loadgroup, and the tests that
share one host resource (127.0.0.1:53, the nested L1, a pip install, a guest booted
once per module) name an xdist_group so that one worker runs them in turn. pytest
9.2 with pytest-xdist 3.8 dropped the groups without a word (pytest-xdist#1386: the
group rides on the node id, which pytest 9.2 no longer lets xdist change), and those
tests then ran side by side: DNS tests skipped with the port taken, two L1s shared
two cores. requirements-dev.txt keeps pytest below 9.2; this test says so if a
group is lost again."""

from __future__ import annotations

import pytest


@pytest.mark.xdist_group("xdist-self-check")
def test_an_xdist_group_reaches_the_scheduler(request):
    if not request.config.getoption("loadgroup", default=False):
        pytest.skip("not run by an xdist worker with --dist loadgroup (make test runs it so)")
    # xdist's worker marks a grouped test's node id with its group; the scheduler
    # groups by that suffix and by nothing else.
    assert request.node.nodeid.endswith("@xdist-self-check"), request.node.nodeid
