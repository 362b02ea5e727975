"""Where adapterctl keeps local state: ``$ADAPTERCTL_HOME`` (default ``~/.cache/adapterctl``).

Layout: ``models/`` (converted base models), ``registry/`` (the embedded default
registry), ``adapters/`` (the server's disk tier of pulled adapters).
"""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The adapterctl home directory (created on first use)."""
    root = Path(os.environ.get("ADAPTERCTL_HOME") or Path.home() / ".cache" / "adapterctl")
    root.mkdir(parents=True, exist_ok=True)
    return root


def default_registry_uri() -> str:
    """``$ADAPTERCTL_REGISTRY`` or the embedded local registry under the home directory."""
    return os.environ.get("ADAPTERCTL_REGISTRY") or f"file://{home() / 'registry'}"
