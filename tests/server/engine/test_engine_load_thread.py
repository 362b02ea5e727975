"""The engine loads on its decode thread (server/omp.py says why) and start() raises what loading
raised."""
from __future__ import annotations

import threading

import pytest


def test_the_engine_loads_on_its_decode_thread(make_engine, monkeypatch):
    """Model load and weight preparation (the engine's big parallel ops) run on the thread that
    decodes, so no other thread of the engine keeps a pool."""
    from adapterctl.server.engine import engine as engine_module

    built_on = []
    real = engine_module.ModelRunner.__init__

    def record(self, *args, **kwargs):
        built_on.append(threading.current_thread().name)
        real(self, *args, **kwargs)

    monkeypatch.setattr(engine_module.ModelRunner, "__init__", record)
    engine = make_engine()
    assert built_on == ["batching-engine"] and engine._thread.name == "batching-engine"


def test_a_failed_load_is_raised_by_start(make_engine, monkeypatch):
    from adapterctl.server.engine import engine as engine_module

    def broken(self, *args, **kwargs):
        raise RuntimeError("no weights here")

    monkeypatch.setattr(engine_module.ModelRunner, "__init__", broken)
    with pytest.raises(RuntimeError, match="no weights here"):
        make_engine()
