"""The whole adapterctl story on the embedded defaults, through the real CLI.

base model prepared -> demo adapter trained for a few steps -> published to the
local registry -> server started -> one generation with the adapter and one
without, side by side -> the adapter's metrics lines -> server stopped.
Run with ``make demo``. State lives under $ADAPTERCTL_HOME (~/.cache/adapterctl).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ADAPTER = "movie-reviews"
PROMPT = "The new sci-fi blockbuster was"
console = Console()


def cli(*args: str) -> str:
    """Run one adapterctl command, show it, return its stdout (fail loudly)."""
    console.print(f"[bold cyan]$ adapterctl {' '.join(args)}[/]")
    res = subprocess.run([sys.executable, "-m", "adapterctl.client.cli.main", *args], stdout=subprocess.PIPE, text=True)
    if res.returncode != 0:
        sys.exit(f"demo: `adapterctl {args[0]}` failed with exit code {res.returncode}")
    if "--json" not in args:
        print(res.stdout, end="", flush=True)
    return res.stdout.strip()


def wait_ready(ready_file: Path, proc: subprocess.Popen, timeout: float = 600.0) -> dict:
    """Block until the server writes its ready file (it does so once SERVING)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"demo: server exited early with code {proc.returncode}")
        if ready_file.is_file() and ready_file.stat().st_size:
            return json.loads(ready_file.read_text())
        time.sleep(0.2)
    sys.exit("demo: server did not become ready in time")


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="adapterctl-demo-"))
    adapter_dir = work / "adapter"
    cli("train", "--data", str(HERE / "movie_reviews.jsonl"), "--output", str(adapter_dir),
        "--max-steps", os.environ.get("DEMO_STEPS", "20"), "--lr", "1e-3", "--seed", "0")
    ref = cli("publish", str(adapter_dir), "--name", ADAPTER, "--quiet").splitlines()[-1]
    cli("list", ADAPTER)

    ready = work / "ready.json"
    console.print("[bold cyan]$ adapterctl serve --port 0 --metrics-port 0 --http-port 0 &[/]")
    server = subprocess.Popen([sys.executable, "-m", "adapterctl.client.cli.main", "serve", "--port", "0",
                               "--metrics-port", "0", "--http-port", "0", "--ready-file", str(ready)])
    try:
        info = wait_ready(ready, server)
        target = f"{info['host']}:{info['port']}"
        common = ("--server", target, "--max-new-tokens", "24")
        tuned = json.loads(cli("generate", *common, "--adapter", ref, "--json", PROMPT))
        base = json.loads(cli("generate", *common, "--json", PROMPT))

        table = Table(title=f"prompt: {PROMPT!r} (greedy, 24 tokens)", show_lines=True)
        table.add_column(f"with adapter {tuned['adapter']['name']}:{tuned['adapter']['version']}")
        table.add_column("base model, no adapter")
        table.add_row(tuned["text"], base["text"])
        console.print(table)

        url = f"http://{info['host']}:{info['metrics_port']}/metrics"
        console.print(f"[bold cyan]$ curl -s {url} | grep 'adapter=\"{ADAPTER}\"'[/]")
        metrics = urllib.request.urlopen(url, timeout=10).read().decode()
        lines = [line for line in metrics.splitlines()
                 if f'adapter="{ADAPTER}"' in line and not line.startswith("#") and "_bucket{" not in line]
        print("\n".join(lines) or "(no metrics lines for the adapter!)", flush=True)
        if not lines:
            sys.exit("demo: metrics did not show the adapter's request")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        console.print(f"server stopped (exit code {code})")


if __name__ == "__main__":
    main()
