"""``python -m adapterctl.trainer [train options]``: the entry point distributed launchers run
(``accelerate launch -m adapterctl.trainer ...`` or ``torchrun -m adapterctl.trainer ...``)."""
from __future__ import annotations

import sys

from adapterctl.errors import AdapterctlError


def main() -> None:
    from adapterctl.trainer.cli import make_command

    try:
        make_command("adapterctl-train").main(standalone_mode=True)
    except AdapterctlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
