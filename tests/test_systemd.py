"""The unit file is checked by systemd's own verifier where it is installed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

UNIT = os.path.join(ROOT, "systemd", "waportd.service")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path):
    # Point ExecStart at the waportd this test run installed, so verify can check it exists.
    waportd = os.path.join(os.path.dirname(sys.executable), "waportd")
    text = open(UNIT).read().replace("/opt/waport/bin/waportd", waportd)
    unit = tmp_path / "waportd.service"
    unit.write_text(text)
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on many problems (e.g. an unknown KillMode): any line about our file is one.
    problems = [line for line in (out.stdout + out.stderr).splitlines() if str(unit) in line]
    assert out.returncode == 0, out.stdout + out.stderr
    assert not problems, problems


def test_unit_keeps_the_settings_operations_rely_on():
    text = open(UNIT).read()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "TimeoutStopSec=",
                 "KillMode=mixed", "Restart=on-failure", "RestartPreventExitStatus=2", "StateDirectory=waport",
                 "RuntimeDirectory=waport", "NoNewPrivileges=yes", "ProtectSystem=strict", "ExecReload=",
                 "ConfigurationDirectory=waport", "User=waport", "ProtectHome=yes", "PrivateTmp=yes",
                 "PrivateDevices=yes", "RestrictAddressFamilies="):
        assert line in text
