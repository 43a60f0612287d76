"""The HTML audit report renders in headless Chromium, offline, without console errors.

Chromium (Debian package ``chromium``) is installed by ``python3 tasks.py test``
when missing and running as root. Console messages are read from Chromium's own
log (``--enable-logging=stderr``: every console message, CSP violation and
uncaught exception is a ``:CONSOLE`` line); a control page proves the scan works
on the installed build.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from ferry.audit import cli as audit_cli

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1280, 2000


def scenario() -> ModuleType:
    """tests/unit/audit_scenario.py (the logs the unit tests use)."""
    if "audit_scenario" in sys.modules:
        return sys.modules["audit_scenario"]
    path = Path(__file__).resolve().parents[1] / "unit" / "audit_scenario.py"
    spec = importlib.util.spec_from_file_location("audit_scenario", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["audit_scenario"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def screenshot(page: Path, png: Path, tmp: Path) -> list[str]:
    """Render ``page`` to ``png``; return Chromium's console lines."""
    assert CHROMIUM is not None
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={tmp / 'chromium-profile'}",
        "--enable-logging=stderr",
        "--v=0",
        f"--screenshot={png}",
        f"--window-size={WIDTH},{HEIGHT}",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]


def png_size(png: Path) -> tuple[int, int]:
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


# As root (CI), `python3 tasks.py test` installs chromium, and a missing browser is a failure;
# elsewhere the two browser tests are skipped.
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None and os.geteuid() != 0,
    reason="chromium not installed (python3 tasks.py test installs it as root)",
)


@needs_chromium
def test_the_console_scan_catches_errors(tmp_path: Path) -> None:
    page = tmp_path / "control.html"
    page.write_text(
        '<!DOCTYPE html><html><body><p>control</p><script>console.error("control-error");'
        "notDefined();</script></body></html>"
    )
    console = screenshot(page, tmp_path / "control.png", tmp_path)
    assert any("control-error" in line for line in console)
    assert any("Uncaught ReferenceError" in line for line in console)


@needs_chromium
def test_the_html_report_renders_without_console_errors(tmp_path: Path) -> None:
    scn_mod = scenario()
    scn = scn_mod.standard(tmp_path)
    page = tmp_path / "report.html"
    now = "2026-11-21T10:00:00Z"
    argv = ["report", "--outside", str(scn.outside), "--inside", str(scn.inside), "--now", now]
    assert audit_cli.run([*argv, "--format", "html", "-o", str(page)]) == 0
    png = tmp_path / "report.png"
    console = screenshot(page, png, tmp_path)
    assert console == []  # no error, no CSP violation (nothing external was asked for)
    assert png_size(png) == (WIDTH, HEIGHT)
    assert png.stat().st_size > 30_000  # charts and tables, not a blank page
    shutil.copy(png, tmp_path / "keep.png")
