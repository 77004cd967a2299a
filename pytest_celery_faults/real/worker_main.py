"""Start a real prefork worker for the user's app, with the plugin's hooks in its children.

    python -m pytest_celery_faults.real.worker_main MODULE:APP BROKER_URL BACKEND_URL QUEUE

Only the broker, the result backend, the queue and (on Redis) a short
visibility timeout are changed; every other setting is the app's own.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable

from celery import signals
from kombu.message import Message

from ..apps import load_app
from . import child


def main(argv: list[str]) -> None:
    app_path, broker_url, backend_url, queue, visibility_timeout = argv
    app = load_app(app_path)
    options = dict(app.conf.broker_transport_options or {})
    options["visibility_timeout"] = float(visibility_timeout)
    # Redis restores unacked messages in a sweep every interval x throttle seconds
    # (about 100 s by default); the run shortens it with the visibility timeout.
    options["unacked_restore_interval"] = 1
    options["unacked_restore_throttle"] = 1
    app.conf.update(
        broker_url=broker_url,
        result_backend=backend_url,
        task_default_queue=queue,
        broker_transport_options=options,
        worker_hijack_root_logger=False,
        # No remote control: its per-node exclusive queue would clash with another
        # run's worker on the same host, and the runner never uses it.
        worker_enable_remote_control=False,
    )
    with open(os.environ[child.PLAN_ENV], encoding="utf-8") as handle:
        record = json.load(handle)["record"]

    def ready(**_: object) -> None:
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": "ready", "pid": os.getpid()}) + "\n")

    record_acks(record)
    signals.worker_process_init.connect(lambda **_: child.install(), weak=False)
    signals.worker_ready.connect(ready, weak=False)
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            "--concurrency=1",
            f"--queues={queue}",
            f"--hostname={queue}@%h",  # a node name unique to the run
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "--loglevel=ERROR",
        ]
    )


def record_acks(record: str) -> None:
    """Write an ``acked`` line each time this (parent) process acks a task message.

    An early ack is sent by the parent when the child reports the job accepted,
    while the child already runs the body: the child waits for this line before
    a fault that kills the whole worker, so the fault lands after the ack, where
    the emulation puts it (see ``child.ChildFaults.fire``).
    """
    original: Callable[..., None] = Message.ack

    def ack(self: Message, multiple: bool = False) -> None:
        original(self, multiple=multiple)
        task_id = (self.headers or {}).get("id")
        with open(record, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"event": "acked", "task_id": task_id}) + "\n")

    Message.ack = ack  # type: ignore[method-assign]


if __name__ == "__main__":
    main(sys.argv[1:])
