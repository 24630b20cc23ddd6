"""Scratch folders left by a killed step are removed by the next one; live ones never are."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from publish_platform.scratch import ScratchFolder, sweep

HOLDER = """
import sys, time
from pathlib import Path
import pytest

from publish_platform.scratch import ScratchFolder
held = ScratchFolder("diff", root=Path(sys.argv[1]))
(held.path / "spill.parquet").write_bytes(b"x" * 4096)
print(held.path, flush=True)
time.sleep(120)
"""


def holder(root: Path) -> tuple[subprocess.Popen[str], Path]:
    """A process that makes a scratch folder and holds it, as a running step does."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    return process, Path(process.stdout.readline().strip())


def test_a_killed_process_folder_is_swept_and_a_live_one_is_not(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    live, live_folder = holder(tmp_path)
    killed, killed_folder = holder(tmp_path)
    try:
        os.kill(killed.pid, signal.SIGKILL)
        killed.wait(timeout=10)
        ours = ScratchFolder("plan", root=tmp_path)  # sweeps first, with the default grace
        assert killed_folder.exists(), "a folder younger than the grace may be being made"
        other = tmp_path / "someone-else"
        other.mkdir()

        with caplog.at_level(logging.WARNING, "publish_platform.scratch"):
            assert sweep(tmp_path, grace_s=0) == [killed_folder]
        assert f"removed scratch folder {killed_folder} (0.0 MB)" in caplog.text
        assert not killed_folder.exists()
        assert live_folder.exists() and (live_folder / "spill.parquet").exists()
        assert ours.path.exists() and other.exists()  # our own live folder; not a scratch one
    finally:
        live.kill()
        live.wait(timeout=10)
    assert sweep(tmp_path, grace_s=0) == [live_folder]
    ours.cleanup()
    assert not ours.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["someone-else"]


def test_a_scratch_folder_is_removed_when_its_step_ends(tmp_path: Path) -> None:
    with ScratchFolder("publish", root=tmp_path) as folder:
        (folder / "plan.parquet").write_bytes(b"plan")
        assert sweep(tmp_path, grace_s=0) == []  # held by this process
    assert not folder.exists()
