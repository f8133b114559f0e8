"""Open a liverseg report in headless Chromium and keep what it showed.

    python pipelines/report_in_browser.py /tmp/liverseg_qc_report/report.html

writes ``pipelines/results/report_screenshot.png`` (full page) and
``pipelines/results/report_browser.json`` (console errors, pictures and their natural widths,
table row counts) and exits 1 when the page has console errors, a picture that did not load or
no table. The test suite does the same check on a report it makes (tests/test_report_browser.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from liverseg.browser import check_page

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("report", type=Path, help="report.html from liverseg score/evaluate")
    parser.add_argument("--screenshot", type=Path, default=RESULTS / "report_screenshot.png")
    parser.add_argument("--json", type=Path, default=RESULTS / "report_browser.json")
    args = parser.parse_args()
    page = check_page(args.report, args.screenshot)
    record = {"report": str(args.report), "title": page.title, "console_errors": page.console_errors,
              "images": page.images, "broken_images": page.broken_images, "tables_rows": page.tables,
              "screenshot": str(args.screenshot)}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    ok = not page.console_errors and not page.broken_images and bool(page.tables)
    print(f"{len(page.images)} pictures ({len(page.broken_images)} broken), {len(page.tables)} tables, "
          f"{len(page.console_errors)} console errors; screenshot {args.screenshot}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
