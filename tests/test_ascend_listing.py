"""`dsv3-run backends` says "emulated" for ascend under the CPU emulation, never that an NPU is here."""
import os
import subprocess
import sys
from pathlib import Path

EMULATION = Path(__file__).parent / "ascend_emulation"


def _ascend_row(env_extra: dict) -> str:
    env = {**os.environ, **env_extra}
    out = subprocess.run([sys.executable, "-m", "dsv3.commands.main", "backends"], capture_output=True, text=True,
                         env=env, timeout=120).stdout
    return next(line for line in out.splitlines() if line.startswith("ascend"))


def test_backends_marks_the_emulation():
    emulated = _ascend_row({"DSV3_ASCEND_EMULATION": "1",
                            "PYTHONPATH": os.pathsep.join(filter(None, [str(EMULATION), os.environ.get("PYTHONPATH")]))})
    assert " emulated " in emulated and " yes " not in emulated
    plain = _ascend_row({"DSV3_ASCEND_EMULATION": "0"})
    assert " no " in plain
