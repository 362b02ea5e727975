"""Server logging: optional one-JSON-object-per-line output carrying the structured
request fields (request_id, adapter, version, tokens, latency_ms, status) passed as ``extra``."""
from __future__ import annotations

import json
import logging
import time

# LogRecord attributes that are not user-supplied ``extra`` fields.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "msg", ...extra}``; exceptions under ``exc``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class FieldsFormatter(logging.Formatter):
    """Plain text with the structured fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = " ".join(f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_"))
        return f"{text} {fields}" if fields else text


def configure(json_lines: bool, level: int = logging.INFO) -> None:
    """Route the root logger to stderr in the chosen format; ``adapterctl`` logs at ``level``."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_lines else
                         FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.captureWarnings(True)  # library warnings become log records (JSON lines stay parseable)
    logging.getLogger("adapterctl").setLevel(min(level, root.level or logging.WARNING))
