"""The report of a real run opened in headless Chromium (Debian's `chromium`, installed by
.ci/run): it loads with no console message and no network request, and a screenshot of its
first screen is saved as a test artifact (test-artifacts/report-first-screen.png)."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_PROBE = "<html><body><script>console.error('probe-error')</script>probe</body></html>"


def _chromium(url: str, shot: Path) -> str:
    assert CHROMIUM is not None
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0",
                           "--window-size=1280,900", f"--screenshot={shot}", url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", head[16:24])
    return int(w), int(h)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (.ci/run installs Debian's chromium with apt-get)")
def test_report_opens_in_chromium_without_console_errors(tmp_path: Path) -> None:
    # The console check can fail: a page that logs an error is seen.
    probe = tmp_path / "probe.html"
    probe.write_text(_PROBE)
    assert "probe-error" in _chromium(probe.as_uri(), tmp_path / "probe.png")

    proc = run_cli(["run", "--n", "80", "--store", str(tmp_path / "store"), "--tracking-uri",
                    f"sqlite:///{tmp_path / 'mlflow.db'}", "--json"], cwd=tmp_path, timeout=600)
    assert proc.returncode in (0, 1, 3), proc.stderr[-3000:]
    report = Path(json.loads(proc.stdout)["report"])
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report-first-screen.png"
    shot.unlink(missing_ok=True)
    log = _chromium(report.as_uri(), shot)
    console = [line for line in log.splitlines() if re.search(r":CONSOLE[:(]", line)]
    assert console == [], console
    assert not re.search(r"net::ERR_|Failed to load resource", log), log[-2000:]
    assert _png_size(shot) == (1280, 900) and shot.stat().st_size > 20_000  # a rendered page, not a blank one
