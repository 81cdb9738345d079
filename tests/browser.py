"""A page opened in real headless Chromium (Debian's `chromium`), as a reader's browser opens it.

    python tests/browser.py PAGE.html SCREENSHOT.png [HEIGHT]

One Chromium run loads the page from its file, lets its scripts run to idle, and gives back the DOM they left, every
message the page wrote to the console (Chromium logs them on stderr with --enable-logging) and a screenshot. Name
resolution is mapped to nothing, so that a page that needs the network shows it. As root, Chromium runs only without
its sandbox; a fresh profile folder keeps runs apart.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

INSTALL = "apt-get install -y chromium (tests/setup-chromium.sh does it where it runs as root)"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=30000", "--enable-logging=stderr", "--v=0")
CONSOLE = re.compile(r':CONSOLE[:(\d)]*\] (".*)')  # [pid:tid:time:INFO:CONSOLE:1] "message", source: file (line)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Charts(HTMLParser):
    """The plotly charts of a DOM (`div.plotly-graph-div`) and, for each, whether plotly drew it: the `js-plotly-plot`
    class it adds, an SVG `main-svg`, and how many trace groups it drew."""

    def __init__(self):
        super().__init__()
        self.charts: dict[str, dict] = {}
        self.open: list[tuple[str, str | None]] = []  # (tag, the chart it opens or None)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        chart = None
        if "plotly-graph-div" in classes:
            chart = attributes.get("id") or f"chart without id {len(self.charts) + 1}"
            self.charts[chart] = {"drawn": "js-plotly-plot" in classes, "svg": False, "traces": 0}
        inside = [name for _, name in self.open if name]
        if inside:
            if "main-svg" in classes:
                self.charts[inside[-1]]["svg"] = True
            if "trace" in classes and "scatter" in classes:
                self.charts[inside[-1]]["traces"] += 1
        if tag not in ("br", "img", "input", "meta", "link", "hr", "path", "rect", "line", "circle", "use"):
            self.open.append((tag, chart))

    def handle_endtag(self, tag):
        for index in range(len(self.open) - 1, -1, -1):
            if self.open[index][0] == tag:
                del self.open[index:]
                break


@dataclass
class Rendering:
    dom: str
    console: list[str]  # every console message, errors and uncaught exceptions included
    charts: dict[str, dict]  # chart id -> {"drawn", "svg", "traces"}

    def undrawn(self) -> list[str]:
        return [name for name, chart in self.charts.items()
                if not (chart["drawn"] and chart["svg"] and chart["traces"] > 0)]


def render(page: Path, screenshot: Path, height: int = 1600) -> Rendering:
    binary = chromium()
    if binary is None:
        raise FileNotFoundError(f"chromium is not installed: {INSTALL}")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        result = subprocess.run([binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size=1400,{height}",
                                 f"--screenshot={screenshot}", "--dump-dom", page.resolve().as_uri()],
                                capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not result.stdout:
        raise RuntimeError(f"chromium exited with {result.returncode}: {result.stderr[-2000:]}")
    charts = Charts()
    charts.feed(result.stdout)
    console = [match.group(1) for match in map(CONSOLE.search, result.stderr.splitlines()) if match]
    return Rendering(result.stdout, console, charts.charts)


if __name__ == "__main__":
    page, shot = Path(sys.argv[1]), Path(sys.argv[2])
    rendering = render(page, shot, int(sys.argv[3]) if len(sys.argv) > 3 else 1600)
    print(f"{len(rendering.charts)} charts, undrawn: {rendering.undrawn() or 'none'}; console: "
          f"{rendering.console or 'nothing'}; screenshot {shot} ({os.path.getsize(shot):,} bytes)")
    sys.exit(1 if rendering.undrawn() or rendering.console else 0)
