"""Rebuild the reports of an output directory without running anything (fMRIPrep's ``--reports-only``).

The participant pages asked for, the QC index over every image, then the group page.

    python -m bids_app.reports OUTPUT_DIR [--participant-label 01 05] [--no-group]
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from bids_app.reports import build_group_report, build_participant_reports

log = logging.getLogger("bids_app.reports")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bids_app.reports", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path, help="a counterseg output directory")
    parser.add_argument("--participant-label", nargs="+", metavar="LABEL",
                        help="participants to report on (default: all with outputs)")
    parser.add_argument("--no-group", action="store_true", help="do not rebuild group.html")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [counterseg] %(levelname)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not (args.output_dir / "dataset_description.json").is_file():
        log.error("%s is not a counterseg output directory (no dataset_description.json)", args.output_dir)
        return 66
    written = build_participant_reports(args.output_dir, args.participant_label)
    if not args.no_group:
        written.append(build_group_report(args.output_dir))
    log.info("%d report(s) written", len(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
