"""How operator commands start runs: into Dagster's run queue, or here in the foreground.

Through the queue (the default), a run waits its turn like any other — one run per source,
by priority — and the daemon launches it. ``in_process`` executes it in this process through the
same job definition, recording into the same instance (``drain`` always does this).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from publish_platform.runtime import WORKSPACE_YAML, dagster_bin

TERMINAL = {"SUCCESS", "FAILURE", "CANCELED"}


def launch(
    instance: Any,
    job_name: str,
    run_config: dict[str, Any],
    tags: dict[str, str],
    partition_key: str | None = None,
    in_process: bool = False,
) -> str:
    """Start a run of ``job_name``; return its run id."""
    if in_process:
        from publish_platform.defs import defs

        job = defs.resolve_job_def(job_name)
        result = job.execute_in_process(
            run_config=run_config,
            instance=instance,
            partition_key=partition_key,
            tags=tags,
            raise_on_error=False,
        )
        return result.run_id
    all_tags = dict(tags)
    if partition_key is not None:
        from publish_platform.ordering import tags_for_partition

        all_tags = {**tags_for_partition(partition_key), **tags, "dagster/partition": partition_key}
    run_id = str(uuid.uuid4())
    # Dagster's own CLI submits the run to the instance's run coordinator (the queue).
    subprocess.run(
        [
            dagster_bin("dagster"),
            "job",
            "launch",
            "-w",
            str(WORKSPACE_YAML),
            "-j",
            job_name,
            "--run-id",
            run_id,
            "--config-json",
            json.dumps(run_config),
            "--tags",
            json.dumps(all_tags),
        ],
        check=True,
        cwd=Path(WORKSPACE_YAML).parent,
        stdout=subprocess.DEVNULL,
        stderr=sys.stderr,
    )
    return run_id


def wait(instance: Any, run_id: str, timeout_s: float = 3600) -> str:
    """Wait until the run ends; return its final status."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status.value in TERMINAL:
            return run.status.value
        if time.monotonic() > deadline:
            return run.status.value if run else "UNKNOWN"
        time.sleep(1)
