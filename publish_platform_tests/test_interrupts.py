"""Processes started from a background job still stop on SIGTERM (see ``interrupts``)."""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys

# The job of a non-interactive shell, started in the background: it inherits SIGINT ignored.
# After an in-process Dagster execution, the child it starts must still stop on SIGTERM.
SCRIPT = """
import subprocess, sys
{restore}
from dagster import job, op

@op
def one():
    return 1

@job
def single():
    one()

single.execute_in_process()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
child.terminate()
try:
    sys.exit(-child.wait(timeout=10))
except subprocess.TimeoutExpired:
    child.kill()
    sys.exit(99)
"""


def test_a_child_of_a_background_job_stops_on_sigterm() -> None:
    """Without ``handle_interrupts`` the child ignores SIGTERM and the script exits 99: what
    every process the platform started from a background job used to do."""
    restore = "from publish_platform.interrupts import handle_interrupts; handle_interrupts()"
    command = shlex.join([sys.executable, "-c", SCRIPT.format(restore=restore)])
    done = subprocess.run(["sh", "-c", f"{command} & wait $!"], timeout=120, check=False)
    assert done.returncode == signal.SIGTERM, done.returncode
