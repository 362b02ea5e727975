"""adapterctl: adapter registry and multi-adapter LoRA inference server.

The root package holds only what every layer shares: the version, the error
hierarchy (:mod:`adapterctl.errors`), adapter references (:mod:`adapterctl.refs`),
the local home directory (:mod:`adapterctl.home`), the base-model resolver
(:mod:`adapterctl.basemodel`) and config-dataclass -> CLI options (:mod:`adapterctl.options`).
"""
from __future__ import annotations

__version__ = "0.1.0"
