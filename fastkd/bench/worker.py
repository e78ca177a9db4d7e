"""One provider's measurements in a fresh process: `python -m fastkd.bench.worker REQUEST.json`.

Prints one JSON record per case on stdout, as each case finishes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .cases import Case
from .measure import ReferenceStore, Settings, measure
from .run import apply_threads


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request = json.loads(Path(argv[0]).read_text())
    settings = Settings(**request["settings"])
    apply_threads(settings)
    references = ReferenceStore(settings.device, settings.seed, Path(request["references"]))
    built: dict = {}
    for case_fields in request["cases"]:
        record = measure(Case(**case_fields), request["provider"], settings, references, built)
        print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
