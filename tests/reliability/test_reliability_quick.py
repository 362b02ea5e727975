"""``python -m bench.reliability.run --quick`` (on the tiny model) runs end to end and its
invariants hold: no crash or INTERNAL/UNKNOWN answer under fuzzing, no wrong or lost soak
answer, bounded RSS, every drill passed, no partial version after publish kills, no
token in any log line or metric. Throughput is never checked."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# The figures, in order: the contract of the last stdout line.
FIGURES = ["fuzz_inputs", "fuzz_crashes", "fuzz_internal", "soak_requests", "soak_wrong_or_lost", "soak_rss_growth",
           "drills_passed", "drills_total", "publish_kills", "partial_versions_seen"]


def test_quick_reliability_run_holds_its_invariants(tiny_base, tmp_path):
    repo = Path(__file__).resolve().parents[2]
    detail = tmp_path / "detail.json"
    done = subprocess.run([sys.executable, "-m", "bench.reliability.run", "--quick", "--base-model",
                           str(tiny_base.path), "--detail", str(detail)], cwd=repo, capture_output=True, text=True,
                          timeout=1500)
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert list(last) == list(FIGURES)
    report = json.loads(detail.read_text())["detail"]
    assert done.returncode == 0, (last, [d for d in report["drills"] if not d["passed"]], done.stderr[-3000:])
    assert last["fuzz_inputs"] >= 1000 and last["fuzz_crashes"] == 0 and last["fuzz_internal"] == 0
    assert report["fuzz_grpc"]["greedy_unchanged"] and report["fuzz_grpc"]["alive"]
    assert last["soak_requests"] == report["budget"]["soak_requests"] and last["soak_wrong_or_lost"] == 0
    assert report["soak"]["completed"] > 0 and last["soak_rss_growth"] < 0.10
    assert last["drills_passed"] == last["drills_total"] >= 9
    assert last["publish_kills"] == report["budget"]["publish_kills"] and last["partial_versions_seen"] == 0
    assert report["publish_kill"]["next_version_ok"] and report["publish_kill"]["orphans_left"] == 0
    assert report["secret_lines_in_logs_or_metrics"] == 0
    # the hostile-traffic KV growth is given back once the server is idle
    assert report["fuzz_grpc"]["hostile_rss"]["rss_idle_mib"] <= report["fuzz_grpc"]["hostile_rss"]["rss_peak_mib"]
