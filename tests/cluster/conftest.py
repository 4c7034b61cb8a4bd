"""A fresh 3-node cluster per test module (fault tests leave nodes killed or restarted)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.cluster import ClusterError, RabbitCluster, running_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """Three fresh nodes; a cluster that cannot start fails the test (never skips)."""
    try:
        with running_cluster() as started:
            yield started
    except ClusterError as exc:
        pytest.fail(f"could not run the 3-node test cluster: {exc}", pytrace=False)
