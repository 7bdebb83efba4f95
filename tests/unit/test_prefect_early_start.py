"""Prefect's temporary server started before the imports (rlhf.infra.env.start_prefect_server_early), on a stand-in
for Prefect's per-process server: the caller goes on at once, the flow's ``start()`` waits for the boot."""

from __future__ import annotations

import sys
import threading
import time

import prefect.server.api.server as prefect_server
import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from rlhf.infra.env import start_prefect_server_early


class FakeServer:
    """Prefect's SubprocessASGIServer as the flow sees it: one instance per process, ``start()`` boots it once."""

    instance: FakeServer | None = None

    def __new__(cls):
        if cls.instance is None:
            cls.instance = super().__new__(cls)
            cls.instance.running, cls.instance.boots, cls.instance.booted = False, 0, threading.Event()
            cls.instance.fail = False
        return cls.instance

    def start(self, timeout: int | None = None) -> None:
        if self.running:
            return
        self.running = True
        self.boots += 1
        time.sleep(0.3)  # the boot
        if self.fail:
            self.running = False
            raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")
        self.booted.set()


@pytest.fixture
def fake_server(monkeypatch):
    FakeServer.instance = None
    monkeypatch.setattr(prefect_server, "SubprocessASGIServer", FakeServer)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield FakeServer


def test_the_server_boots_in_the_background_and_the_flows_start_waits_for_it(fake_server):
    t0 = time.perf_counter()
    start_prefect_server_early()
    assert time.perf_counter() - t0 < 0.2  # the caller goes on to its imports
    server = fake_server()
    assert not server.booted.is_set()
    server.start()  # what the flow's client does
    assert server.booted.is_set() and server.boots == 1  # booted once, by the background thread


def test_the_wait_for_the_boot_imports_the_prewarm_modules(fake_server, tmp_path, monkeypatch):
    (tmp_path / "rlhf_prewarm_probe.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rlhf_prewarm_probe", raising=False)
    start_prefect_server_early(prewarm=("rlhf_prewarm_probe",))
    assert "rlhf_prewarm_probe" not in sys.modules  # not at the call: the caller goes on to its own imports
    fake_server().start()  # the boot is still under way: the wait imports it
    assert "rlhf_prewarm_probe" in sys.modules and fake_server().booted.is_set()


def test_a_finished_boot_imports_nothing_more(fake_server, tmp_path, monkeypatch):
    (tmp_path / "rlhf_prewarm_late.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rlhf_prewarm_late", raising=False)
    start_prefect_server_early(prewarm=("rlhf_prewarm_late",))
    for thread in threading.enumerate():
        if thread.name == "prefect-server":
            thread.join(5)  # the boot is over before the flow starts
    fake_server().start()
    assert "rlhf_prewarm_late" not in sys.modules  # the flow's own stage imports it when it needs it


def test_a_failed_boot_is_raised_by_the_flows_own_start(fake_server):
    fake_server().fail = True
    start_prefect_server_early()
    with pytest.raises(RuntimeError, match="ephemeral Prefect API server"):
        fake_server().start()
    assert fake_server().boots == 2  # the background boot, then Prefect's own again, which raised


def test_nothing_starts_with_a_prefect_api_url(fake_server):
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:4200/api"}):
        start_prefect_server_early()
    time.sleep(0.05)
    assert fake_server.instance is None
