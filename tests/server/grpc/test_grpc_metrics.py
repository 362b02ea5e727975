"""Per-adapter metrics with the label cap, cache/engine/info metrics, and promtool on the exposition."""
from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest


@pytest.fixture(scope="module")
def traffic(fresh_server):
    """Requests on base + 4 adapters (cap is 3 names) + one unknown adapter."""
    from adapterctl.client import Client
    from adapterctl.errors import NotFound

    with Client(fresh_server.address, timeout=60) as c:
        c.generate("hi", max_new_tokens=3)
        for name in ("alpha", "beta", "gamma", "delta", "alpha"):
            list(c.generate_stream("hi", adapter=name, max_new_tokens=3))
        with pytest.raises(NotFound):
            c.generate("hi", adapter="zzz-unknown", max_new_tokens=3)
    return fresh_server.server.metrics_port


def _get(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_per_adapter_series_are_capped(traffic, metrics_of):
    m = metrics_of(traffic)
    assert _get(m, "adapterctl_requests_total", adapter="__base__", code="OK", api="grpc") == 1
    assert _get(m, "adapterctl_requests_total", adapter="alpha", code="OK", api="grpc") == 2
    for name in ("beta", "gamma"):
        assert _get(m, "adapterctl_requests_total", adapter=name, code="OK", api="grpc") == 1
    # the 4th distinct adapter and the unknown one share __other__
    assert _get(m, "adapterctl_requests_total", adapter="__other__", code="OK", api="grpc") == 1
    assert _get(m, "adapterctl_requests_total", adapter="__other__", code="NOT_FOUND", api="grpc") == 1
    adapters = {dict(labels).get("adapter") for (name, labels) in m if name == "adapterctl_requests_total"}
    assert adapters == {"__base__", "alpha", "beta", "gamma", "__other__"}
    assert _get(m, "adapterctl_generated_tokens_total", adapter="alpha") == 6
    assert _get(m, "adapterctl_prompt_tokens_total", adapter="alpha") > 0
    assert _get(m, "adapterctl_time_to_first_token_seconds_count", adapter="alpha") == 2
    assert _get(m, "adapterctl_time_per_output_token_seconds_count", adapter="alpha") == 2
    assert _get(m, "adapterctl_request_duration_seconds_count", adapter="__other__") == 2


def test_cache_engine_and_info_metrics(traffic, metrics_of, tiny_base):
    m = metrics_of(traffic)
    assert _get(m, "adapterctl_adapter_cache_misses_total", tier="device") >= 4
    assert sum(_get(m, "adapterctl_adapter_cache_hits_total", tier=t) for t in ("device", "host")) >= 1
    assert _get(m, "adapterctl_adapter_loads_total", source="registry") >= 4
    assert _get(m, "adapterctl_adapter_load_duration_seconds_count", source="registry") >= 4
    assert _get(m, "adapterctl_adapters_resident", tier="device") >= 1
    assert _get(m, "adapterctl_adapter_resident_bytes", tier="device") > 0
    # 8 slots of max rank 8 in pages of 8: one page per slot, one page per resident adapter (ranks <= 8)
    assert _get(m, "adapterctl_device_lora_pages", state="total") == 8
    resident = _get(m, "adapterctl_adapters_resident", tier="device")
    assert resident >= 1 and _get(m, "adapterctl_device_lora_pages", state="used") == resident
    assert _get(m, "adapterctl_engine_batch_size_count") > 0
    assert _get(m, "adapterctl_engine_running_requests") == 0
    assert _get(m, "adapterctl_prefix_cache_tokens_total", result="miss") > 0  # "hi" is shorter than a block
    info = [dict(labels) for (name, labels) in m if name == "adapterctl_base_model_info"]
    assert info and info[0]["fingerprint"] == tiny_base.fingerprint and info[0]["device"] == "cpu"
    assert info[0]["dtype"] == "float32"  # what the shared server was started with (conftest pins it)


def test_exposition_passes_promtool(traffic):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package 'prometheus'; `make test` installs it)")
    text = urllib.request.urlopen(f"http://127.0.0.1:{traffic}/metrics", timeout=10).read()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()
