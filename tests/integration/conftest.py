"""The integration tier's session fixtures: the servers of scripts/serve.sh and one smoke run on them.

Defined here, once, so every module of the tier shares one set of servers and one smoke
run (a failure to start is cached by pytest and re-raised to each test that needs them).
"""

from __future__ import annotations

import pytest
from servers import LiveServers, SmokeOutcome, run_smoke, start_servers, stop_servers


@pytest.fixture(scope="session")
def live_servers(request, tmp_path_factory) -> LiveServers:
    """The servers of scripts/serve.sh, started once per session and stopped at its end."""
    servers = start_servers(tmp_path_factory.mktemp("live-servers"))
    request.config.add_cleanup(lambda: stop_servers(servers))
    return servers


@pytest.fixture(scope="session")
def smoke_outcome(live_servers: LiveServers) -> SmokeOutcome:
    """One completed run of the smoke deployment (run once per session)."""
    return run_smoke(live_servers)
