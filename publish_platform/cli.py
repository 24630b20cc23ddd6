"""``publish-platform``: the operator's command line.

Every command works on the Dagster instance named by ``DAGSTER_HOME`` (as Dagster's own CLI does;
default ``<PUBLISH_PLATFORM_HOME>/dagster``) and on the S3 and metastore configured by
``PUBLISH_PLATFORM_*`` and boto3's own variables.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from publish_platform.config import Settings, load_settings
from publish_platform.interrupts import handle_interrupts

REQUEUE_PRIORITY_BOOST = 100_000  # a requeued batch goes ahead of everything queued


def _dagster_home(settings: Settings) -> Path:
    home = os.environ.get("DAGSTER_HOME")
    if home:
        return Path(home)
    path = (settings.home / "dagster").resolve()
    os.environ["DAGSTER_HOME"] = str(path)
    return path


def _instance(settings: Settings) -> Any:
    from dagster import DagsterInstance

    from publish_platform.runtime import write_instance_yaml

    home = _dagster_home(settings)
    if not (home / "dagster.yaml").exists():
        write_instance_yaml(home, storage="sqlite")
    return DagsterInstance.get()


def _print_json(payload: Any) -> None:
    """Indented JSON on stdout; pydantic models are dumped as JSON (datetimes as ISO text)."""

    def dump(value: Any) -> Any:
        if isinstance(value, BaseModel):
            return value.model_dump(mode="json")
        raise TypeError(f"not JSON: {type(value).__name__}")

    sys.stdout.write(
        orjson.dumps(payload, default=dump, option=orjson.OPT_INDENT_2).decode() + "\n"
    )


# --- land ------------------------------------------------------------------------------------


def cmd_land(args: argparse.Namespace) -> int:
    from publish_platform.local_s3 import s3_client, upload_tree

    settings = load_settings()
    folder = Path(args.dir)
    if not folder.is_dir():
        print(f"not a folder: {folder}", file=sys.stderr)
        return 2
    landing = settings.landing_location
    keys = upload_tree(s3_client(), folder, landing.bucket, landing.prefix)
    print(f"landed {len(keys)} object(s) from {folder} into {landing}")
    return 0


# --- drain -----------------------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace) -> int:
    """Discover every ready run and publish it here, in the foreground, through the same job."""
    from publish_platform.defs import defs
    from publish_platform.defs.partitions import workflow_runs
    from publish_platform.landing import discover
    from publish_platform.local_s3 import s3_client
    from publish_platform.publish_state import TERMINAL_NOT_OK, derive_states

    settings = load_settings()
    instance = _instance(settings)
    known = set(instance.get_dynamic_partitions(workflow_runs.name))
    found = discover(s3_client(), settings.landing_location, known, settings.settle_seconds)
    for reason in found.rejected:
        print(f"ignored run folder: {reason}", file=sys.stderr)
    for key, reason in found.waiting.items():
        print(f"not ready: {key}: {reason}")
    keys = [listing.run.partition_key for listing in found.ready]
    if not keys:
        print("nothing to drain")
        return 0
    instance.add_dynamic_partitions(workflow_runs.name, keys)
    job = defs.resolve_job_def("publish_batch")
    for number, listing in enumerate(found.ready, start=1):
        key = listing.run.partition_key
        print(f"[{number}/{len(keys)}] {key} …", flush=True)
        job.execute_in_process(partition_key=key, instance=instance, raise_on_error=False)
        state = derive_states(instance, settings.landing, [key])[0]
        print(f"[{number}/{len(keys)}] {key}: {state.status} {_counts(state)}", flush=True)
    states = derive_states(instance, settings.landing, keys)
    failed = [s for s in states if s.status in TERMINAL_NOT_OK]
    print(f"drained {len(states)} batch(es), {len(failed)} not published")
    return 1 if failed else 0


def _counts(state: Any) -> str:
    m = state.metrics
    return (
        f"(+{m.creates} ~{m.updates} -{m.deletes} ={m.unchanged}, isolated {m.isolated},"
        f" failed {m.failed})"
    )


# --- status ----------------------------------------------------------------------------------


def _state_store(settings: Settings) -> Any:
    from publish_platform.local_s3 import s3_client
    from publish_platform.state import StateStore

    return StateStore(s3_client(), settings.state_location)


def _dead_letters(settings: Settings) -> Any:
    from publish_platform.dead_letters import DeadLetterQueue

    return DeadLetterQueue(_state_store(settings))


def cmd_status(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from publish_platform.observability import current_states, queue_metrics

    settings = load_settings()
    states = current_states(_instance(settings), settings, _state_store(settings))
    if args.json:
        queue = queue_metrics(states, datetime.now(UTC), settings.monitor_window)
        _print_json({"queue": queue, "batches": states})
        return 0
    header = ("PARTITION", "SOURCE", "STATUS", "COUNTS", "STARTED", "UPDATED")
    rows = [
        (
            s.partition_key,
            s.source_id or "-",
            s.status.value,
            _counts(s),
            s.created_at.strftime("%Y-%m-%d %H:%M:%S") if s.created_at else "-",
            s.updated_at.strftime("%Y-%m-%d %H:%M:%S") if s.updated_at else "-",
        )
        for s in states
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 0


def cmd_status_page(args: argparse.Namespace) -> int:
    """The status page as the monitoring schedule last wrote it (``--now``: regenerate first);
    written to a folder and/or served on 127.0.0.1."""
    from datetime import UTC, datetime

    from publish_platform.observability import current_states
    from publish_platform.status_page import publish_status_page, read_status_page

    settings = load_settings()
    state = _state_store(settings)
    if args.now:
        states = current_states(_instance(settings), settings, state)
        url = publish_status_page(state, states, datetime.now(UTC), settings.sla_minutes)
        print(f"regenerated {url}")
    files = read_status_page(state)
    if files is None:
        print(
            "no status page yet: the monitoring schedule has not run (use --now)", file=sys.stderr
        )
        return 1
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (out / name).write_bytes(data)
        print(f"wrote {', '.join(sorted(files))} to {out}")
    if args.serve:
        _serve_status_page(state, args.port)
    return 0


def _serve_status_page(state: Any, port: int) -> None:
    """Serve the stored page, read afresh from the state store on every request."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from publish_platform.status_page import DOCUMENT_NAME, PAGE_NAME, read_status_page

    types = {PAGE_NAME: "text/html; charset=utf-8", DOCUMENT_NAME: "application/json"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            name = self.path.split("?", 1)[0].lstrip("/") or PAGE_NAME
            files = read_status_page(state) or {}
            if name not in types or name not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", types[name])
            self.send_header("Content-Length", str(len(files[name])))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(files[name])

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"serving the status page on http://127.0.0.1:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# --- approve, republish, rollback ----------------------------------------------------------


def _run_and_report(args: argparse.Namespace, instance: Any, run_id: str) -> int:
    from publish_platform.launch import wait

    if not args.in_process and args.no_wait:
        print(f"queued run {run_id}")
        return 0
    status = wait(instance, run_id)
    print(f"run {run_id}: {status}")
    return 0 if status == "SUCCESS" else 1


def _launch_batch(args: argparse.Namespace, run_config: dict, tags: dict[str, str]) -> int:
    from publish_platform.launch import launch
    from publish_platform.publish_state import derive_states

    settings = load_settings()
    instance = _instance(settings)
    if args.partition not in instance.get_dynamic_partitions("workflow_runs"):
        print(f"unknown partition {args.partition}", file=sys.stderr)
        return 2
    run_id = launch(
        instance, "publish_batch", run_config, tags, args.partition, in_process=args.in_process
    )
    code = _run_and_report(args, instance, run_id)
    if args.in_process or not args.no_wait:
        state = derive_states(instance, settings.landing, [args.partition])[0]
        print(f"{args.partition}: {state.status} {_counts(state)}")
    return code


def cmd_approve(args: argparse.Namespace) -> int:
    """Re-run a held batch with the operator's approval, recorded in the plan and the run."""
    run_config = {
        "ops": {
            "plan": {
                "config": {
                    "approve_deletions": True,
                    "approved_by": args.by,
                    "reason": args.reason,
                }
            }
        }
    }
    return _launch_batch(args, run_config, {"publish_platform/approved_by": args.by})


def cmd_republish(args: argparse.Namespace) -> int:
    run_config = {"ops": {"diff": {"config": {"force": args.force}}}}
    return _launch_batch(args, run_config, {"publish_platform/republish": "cli"})


def cmd_rollback(args: argparse.Namespace) -> int:
    from publish_platform.defs.operations import ROLLBACK_JOB
    from publish_platform.launch import launch
    from publish_platform.ordering import PRIORITY_TAG, SOURCE_TAG

    settings = load_settings()
    instance = _instance(settings)
    run_config = {
        "ops": {
            "rollback_to_snapshot": {
                "config": {
                    "source": args.source,
                    "to_serial": args.to,
                    "approved_by": args.approve_by or "",
                    "reason": args.reason,
                }
            }
        }
    }
    # Same source tag as its batches: the queue never runs a rollback beside a publish of it.
    tags = {SOURCE_TAG: args.source, PRIORITY_TAG: "100"}
    run_id = launch(instance, ROLLBACK_JOB, run_config, tags, in_process=args.in_process)
    return _run_and_report(args, instance, run_id)


# --- dead-letter queue and queue control --------------------------------------------------


def cmd_dlq_list(args: argparse.Namespace) -> int:
    entries = _dead_letters(load_settings()).list(include_closed=args.all)
    if args.json:
        _print_json(entries)
        return 0
    for entry in entries:
        print(
            f"{entry.partition_key}  {entry.state}  {entry.source or '-'}"
            f"  {entry.dead_lettered_at:%Y-%m-%d %H:%M:%S}  attempts={len(entry.history)}"
            f"  {entry.reason[:120]}"
        )
    if not entries:
        print("the dead-letter queue is empty")
    return 0


def cmd_dlq_show(args: argparse.Namespace) -> int:
    entry = _dead_letters(load_settings()).get(args.partition)
    if entry is None:
        print(f"{args.partition} is not in the dead-letter queue", file=sys.stderr)
        return 2
    sys.stdout.write(entry.model_dump_json(indent=2) + "\n")
    return 0


def cmd_dlq_requeue(args: argparse.Namespace) -> int:
    """Launch the batch again through the queue, ahead of the rest, and record the requeue."""
    from publish_platform.launch import launch
    from publish_platform.ordering import PRIORITY_TAG, tags_for_partition

    settings = load_settings()
    queue = _dead_letters(settings)
    entry = queue.get(args.partition)
    if entry is None or entry.state != "dead":
        print(f"{args.partition} is not waiting in the dead-letter queue", file=sys.stderr)
        return 2
    instance = _instance(settings)
    raised = int(tags_for_partition(args.partition)[PRIORITY_TAG]) + REQUEUE_PRIORITY_BOOST
    run_id = launch(
        instance,
        "publish_batch",
        {},
        {PRIORITY_TAG: str(raised), "publish_platform/requeued": "dlq"},
        args.partition,
        in_process=args.in_process,
    )
    queue.mark_requeued(args.partition, run_id)
    return _run_and_report(args, instance, run_id)


def cmd_dlq_drop(args: argparse.Namespace) -> int:
    try:
        entry = _dead_letters(load_settings()).drop(args.partition, args.by, args.reason)
    except KeyError as exc:
        print(exc.args[0], file=sys.stderr)
        return 2
    print(f"dropped {entry.partition_key} (by {entry.dropped_by}: {entry.drop_reason})")
    return 0


def cmd_prioritize(args: argparse.Namespace) -> int:
    """Change the priority of a batch's queued run(s)."""
    from dagster import DagsterRunStatus, RunsFilter

    from publish_platform.ordering import PRIORITY_TAG

    instance = _instance(load_settings())
    queued = instance.get_runs(
        RunsFilter(
            tags={"dagster/partition": args.partition},
            statuses=[DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED],
        )
    )
    if not queued:
        print(f"no queued run of {args.partition}", file=sys.stderr)
        return 2
    for run in queued:
        instance.add_run_tags(run.run_id, {PRIORITY_TAG: str(args.priority)})
        print(f"run {run.run_id}: priority {args.priority}")
    return 0


# --- catalog ---------------------------------------------------------------------------------


def cmd_catalog_dump(args: argparse.Namespace) -> int:
    from publish_platform.metastores import open_metastore

    metastore = open_metastore(load_settings())
    try:
        out = sys.stdout.buffer
        for entity in metastore.dump(args.source):
            out.write(orjson.dumps(entity) + b"\n")
    finally:
        metastore.close()
    return 0


# --- bench -----------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace) -> int:
    from publish_platform.bench import run_bench

    result = run_bench(
        args.entities,
        args.changes,
        args.seed,
        Path(args.keep) if args.keep else None,
        sensor_runs=args.sensor_runs,
        latency_batches=args.latency_batches,
        rounds=args.rounds,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    _print_json(result)
    return 0


# --- load ------------------------------------------------------------------------------------


def cmd_load(args: argparse.Namespace) -> int:
    from publish_platform.load import run_load

    postgres = os.environ.get("DAGSTER_POSTGRES_URL") if args.dagster_postgres else None
    if args.dagster_postgres and not postgres:
        print("--dagster-postgres needs DAGSTER_POSTGRES_URL", file=sys.stderr)
        return 2
    result = run_load(
        args.sources,
        args.batches,
        dagster_postgres_url=postgres,
        timeout=args.timeout,
        keep=Path(args.keep) if args.keep else None,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    _print_json(result)
    ok = result["complete"] == result["batches"] and not result["failed_sources"]
    return 0 if ok and not result["order_violations"] else 1


# --- dev -------------------------------------------------------------------------------------


def cmd_dev(args: argparse.Namespace) -> int:
    from publish_platform.dev import run_dev

    return run_dev(
        webserver_port=args.port,
        s3_port=args.s3_port,
        demo=not args.no_demo,
        atlas_port=args.atlas_port if args.atlan else None,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="publish-platform", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser(
        "bench", help="diff + plan against the parse floor and a naive baseline; publish rate"
    )
    bench.add_argument("--entities", type=int, default=100_000)
    bench.add_argument("--changes", type=float, default=0.05, help="share of entities changed")
    bench.add_argument("--seed", type=int, default=7)
    bench.add_argument("--json", help="also write the result to this file")
    bench.add_argument("--keep", help="generate into this folder and keep it")
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds of parse floor, naive baseline and diff + plan, taken in turn; the medians"
        " are reported (a busy machine slows one round, not one contender)",
    )
    bench.add_argument(
        "--sensor-runs", type=int, default=0, help="also time a sensor tick over this many old runs"
    )
    bench.add_argument(
        "--latency-batches",
        type=int,
        default=0,
        help="also measure landed → COMPLETE through the real daemon for this many small batches",
    )
    bench.set_defaults(func=cmd_bench)

    load = commands.add_parser(
        "load",
        help="land many batches of many sources at once into a platform of its own; time to"
        " drain, order, lost and duplicated entities",
    )
    load.add_argument("--sources", type=int, default=20)
    load.add_argument("--batches", type=int, default=200, help="in all, spread over the sources")
    load.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the drain")
    load.add_argument(
        "--dagster-postgres",
        action="store_true",
        help="Dagster storage in the Postgres of DAGSTER_POSTGRES_URL (default: SQLite)",
    )
    load.add_argument("--json", help="also write the result to this file")
    load.add_argument("--keep", help="the platform's folder (logs, catalog), kept")
    load.set_defaults(func=cmd_load)

    dev = commands.add_parser(
        "dev",
        help="run the embedded platform: moto S3, Dagster webserver + daemon, local catalog, demo",
    )
    dev.add_argument("--port", type=int, default=3000, help="Dagster UI port (127.0.0.1)")
    dev.add_argument("--s3-port", type=int, default=9090, help="moto S3 API port (127.0.0.1)")
    dev.add_argument("--no-demo", action="store_true", help="do not land demo workflow runs")
    dev.add_argument(
        "--atlan",
        action="store_true",
        help="publish to Atlan through pyatlan: a local Atlas-compatible server unless"
        " ATLAN_BASE_URL is set",
    )
    dev.add_argument("--atlas-port", type=int, default=21000, help="local Atlas server port")
    dev.set_defaults(func=cmd_dev)

    land = commands.add_parser("land", help="upload a folder that mirrors the object store")
    land.add_argument("dir", help="e.g. ../shared/fixtures/upstream_postgres_run")
    land.set_defaults(func=cmd_land)

    drain = commands.add_parser(
        "drain", help="publish every ready batch in the foreground; non-zero if any failed"
    )
    drain.set_defaults(func=cmd_drain)

    status = commands.add_parser("status", help="one row per batch")
    status.add_argument(
        "--json", action="store_true", help='{"queue": metrics, "batches": [PublishState]}'
    )
    status.set_defaults(func=cmd_status)

    page = commands.add_parser("status-page", help="the customer-facing status page")
    page.add_argument("--now", action="store_true", help="regenerate it from the event log first")
    page.add_argument("--out", help="write index.html and status.json to this folder")
    page.add_argument("--serve", action="store_true", help="serve it on 127.0.0.1")
    page.add_argument("--port", type=int, default=8080)
    page.set_defaults(func=cmd_status_page)

    def launch_options(command: argparse.ArgumentParser) -> None:
        command.add_argument(
            "--in-process",
            action="store_true",
            help="execute here in the foreground instead of through the daemon's run queue",
        )
        command.add_argument(
            "--no-wait", action="store_true", help="return once queued, without waiting"
        )

    approve = commands.add_parser(
        "approve", help="publish a batch held by the deletion-safety check, recording who approved"
    )
    approve.add_argument("partition")
    approve.add_argument("--by", required=True, help="who approves")
    approve.add_argument("--reason", default="", help="why")
    launch_options(approve)
    approve.set_defaults(func=cmd_approve)

    republish = commands.add_parser("republish", help="re-materialize a batch's partition")
    republish.add_argument("partition")
    republish.add_argument(
        "--force", action="store_true", help="re-send every entity even if unchanged"
    )
    launch_options(republish)
    republish.set_defaults(func=cmd_republish)

    rollback = commands.add_parser(
        "rollback", help="republish an older snapshot of a source through the plan checks"
    )
    rollback.add_argument("source", help="connection qualified name")
    rollback.add_argument("--to", type=int, required=True, help="snapshot serial to restore")
    rollback.add_argument("--approve-by", help="approve deletions beyond the threshold")
    rollback.add_argument("--reason", default="")
    launch_options(rollback)
    rollback.set_defaults(func=cmd_rollback)

    dlq = commands.add_parser("dlq", help="the dead-letter queue")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_list = dlq_commands.add_parser("list", help="batches that exhausted the retry tiers")
    dlq_list.add_argument("--json", action="store_true")
    dlq_list.add_argument("--all", action="store_true", help="also requeued and dropped ones")
    dlq_list.set_defaults(func=cmd_dlq_list)
    dlq_show = dlq_commands.add_parser("show", help="an entry with its full retry history")
    dlq_show.add_argument("partition")
    dlq_show.set_defaults(func=cmd_dlq_show)
    dlq_requeue = dlq_commands.add_parser("requeue", help="run it again, at raised priority")
    dlq_requeue.add_argument("partition")
    launch_options(dlq_requeue)
    dlq_requeue.set_defaults(func=cmd_dlq_requeue)
    dlq_drop = dlq_commands.add_parser("drop", help="give up on it, recording why")
    dlq_drop.add_argument("partition")
    dlq_drop.add_argument("--reason", required=True)
    dlq_drop.add_argument("--by", default=os.environ.get("USER", "operator"))
    dlq_drop.set_defaults(func=cmd_dlq_drop)

    prioritize = commands.add_parser("prioritize", help="set the priority of a queued batch")
    prioritize.add_argument("partition")
    prioritize.add_argument("priority", type=int)
    prioritize.set_defaults(func=cmd_prioritize)

    catalog = commands.add_parser("catalog", help="the configured metastore")
    catalog_commands = catalog.add_subparsers(dest="catalog_command", required=True)
    dump = catalog_commands.add_parser("dump", help="active entities as JSON lines")
    dump.add_argument("--source", help="connection qualified name")
    dump.set_defaults(func=cmd_catalog_dump)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    handle_interrupts()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
