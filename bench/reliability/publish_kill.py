"""SIGKILL ``adapterctl publish`` at random points, N times, against the S3 registry:
no partial version may ever be visible, the next publish takes the next number, and
``gc`` removes what the killed publishes left (orphan blobs, multipart uploads)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.reliability.common import log, write_adapter


@dataclass
class KillReport:
    kills: int = 0
    completed_anyway: int = 0   # the publish finished before the kill landed
    partial_versions_seen: int = 0
    next_version_ok: bool = False
    gc_deleted: int = 0
    orphans_left: int = 0
    notes: list[str] = field(default_factory=list)


def _publish_cmd(adapter_dir: Path, name: str, uri: str) -> list[str]:
    return [sys.executable, "-m", "adapterctl.client.cli.main", "publish", str(adapter_dir), "--name", name,
            "--registry", uri, "--quiet"]


def _visible_versions_complete(registry: Any, name: str, root: Path, checked: set[int]) -> int:
    """Pull every version not checked yet (all sha256 verified); count those that fail."""
    partial = 0
    try:
        versions = registry.list_versions(name)
    except Exception as exc:  # NotFound before the first publish landed
        if type(exc).__name__ != "NotFound":
            raise
        return 0
    for m in versions:
        if m.version in checked:
            continue
        checked.add(m.version)
        try:
            registry.pull(f"{name}:{m.version}", root / f"pull-{m.version}")
        except Exception as exc:  # a version that cannot be pulled whole is partial
            partial += 1
            log(f"publish-kill: {name}:{m.version} visible but not whole: {exc}")
    return partial


def run_publish_kills(registry: Any, uri: str, base: Any, root: Path, kills: int, seed: int) -> KillReport:
    rng = random.Random(seed)
    report = KillReport()
    name = "killed-publish"
    env = {**os.environ}
    # One timed publish tells how long the kill window is.
    began = time.monotonic()
    subprocess.run(_publish_cmd(write_adapter(root / "a0", base, seed), name, uri), check=True, env=env,
                   capture_output=True)
    window = time.monotonic() - began
    checked: set[int] = set()
    report.partial_versions_seen += _visible_versions_complete(registry, name, root, checked)
    for i in range(1, kills + 1):
        adapter = write_adapter(root / f"a{i}", base, seed + i)  # new weights: killed uploads leave orphans
        proc = subprocess.Popen(_publish_cmd(adapter, name, uri), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 1.1) * window)  # startup is most of the window; aim at the uploads
        proc.send_signal(signal.SIGKILL)
        rc = proc.wait(30)
        report.kills += 1
        report.completed_anyway += rc == 0
        report.partial_versions_seen += _visible_versions_complete(registry, name, root, checked)
        if i % 10 == 0:
            log(f"publish-kill: {i}/{kills} kills ({report.completed_anyway} finished first), "
                f"{report.partial_versions_seen} partial versions seen")
    highest = max(m.version for m in registry.list_versions(name))
    nxt = registry.publish(write_adapter(root / "final", base, seed + kills + 1), name)
    report.next_version_ok = nxt.version == highest + 1
    gc = registry.gc(grace_seconds=0)
    report.gc_deleted = len(gc.deleted) + gc.purged_incomplete
    again = registry.gc(grace_seconds=0, dry_run=True)
    report.orphans_left = len(again.deleted) + again.purged_incomplete
    report.partial_versions_seen += _visible_versions_complete(registry, name, root, checked)
    report.notes.append(f"kill window {window:.1f}s, next version {nxt.version} after {highest}")
    return report
