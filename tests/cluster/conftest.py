"""A fresh 3-node cluster per test module (fault tests leave nodes killed or restarted).

``BJCLUSTER_CHROOT=/srv/rmq4`` runs the nodes of the RabbitMQ installed in that chroot (as root),
e.g. 4.0 from Debian 13, instead of the machine's own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cluster import RabbitCluster, running_cluster
from tests.support.cluster_processes import ClusterError


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    """Three fresh nodes; a cluster that cannot start fails the test (never skips)."""
    try:
        chroot = os.environ.get("BJCLUSTER_CHROOT")
        with running_cluster(chroot=Path(chroot) if chroot else None) as started:
            yield started
    except ClusterError as exc:
        pytest.fail(f"could not run the 3-node test cluster: {exc}", pytrace=False)
