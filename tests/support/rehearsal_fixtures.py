"""The rehearsal cluster as a pytest fixture, shared by every test module of a session that uses it.

Use it from a test module with

    pytest_plugins = ["rehearsal_fixtures"]

    def test_x(rehearsal):            # infra.rehearsal.cluster.Rehearsal, up and ready
        done = rehearsal.submit_job(["vitpose", "run", "--config", ...], working_dir=REPO)

Registered as a plugin (not imported), the fixture is one definition for the whole session, so the
cluster (PostgreSQL, moto S3, MLflow server, Ray head + 2 worker nodes; ~80 s to start on a loaded 2-core
box) comes up once however many modules use it. Tests that break the cluster (node loss) should use
`Rehearsal.restart_node` to leave it whole, or start a rehearsal of their own with `running()`.
"""

from __future__ import annotations

import time

import pytest

from infra.rehearsal.cluster import Rehearsal, RehearsalConfig, marked_processes


@pytest.fixture(scope="session")
def rehearsal():
    started = time.perf_counter()
    cluster = Rehearsal.start(RehearsalConfig())
    print(f"rehearsal up in {time.perf_counter() - started:.1f} s: {cluster.state.timings_s}")
    try:
        yield cluster
    finally:
        stopping = time.perf_counter()
        cluster.stop()
        print(f"rehearsal down in {time.perf_counter() - stopping:.1f} s")
        # teardown is part of the contract: nothing of the rehearsal may outlive the session
        leftover = marked_processes(cluster.state.root)
        assert not leftover, f"rehearsal processes still running after stop(): {leftover}"
        cluster.remove_files()
