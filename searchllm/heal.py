"""`python -m searchllm.heal RUN [key=value ...]`: heal the subnet a finished run chose, without searching again.

It is the driver's resume of RUN with heal.enabled=true (and the heal.* / execution overrides given): every
stage before the heal reads its saved artefacts back (generated text, level database or scores, the search's
last checkpoint, reformed layers), the subnet is healed on Ray Train, then exported again in every format
of export.format and evaluated. A heal killed midway continues from its last checkpoint on the next call.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from searchllm import driver


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m searchllm.heal RUN [heal.tokens=N heal.workers=N ... key=value]"
    if not args or "=" in args[0]:
        print(f"searchllm: error: no run dir given; {usage}", file=sys.stderr)
        return 2
    run, rest = Path(args[0]), args[1:]
    if not (run / "config.yaml").is_file():
        print(f"searchllm: error: {str(run)!r} is not a searchllm run dir (no config.yaml); {usage}", file=sys.stderr)
        return 2
    if not (run / "best.json").is_file():
        print(
            f"searchllm: error: the run in {str(run)!r} has not finished its search (no best.json); finish it with "
            f"python -m searchllm.driver resume={run}, then heal",
            file=sys.stderr,
        )
        return 2
    return driver.main([f"resume={run}", "heal.enabled=true", *rest])


if __name__ == "__main__":
    sys.exit(main())
