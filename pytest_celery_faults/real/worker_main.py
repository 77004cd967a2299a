"""Start a real prefork worker for the user's app, with the plugin's hooks in it.

    python -m pytest_celery_faults.real.worker_main SETTINGS_JSON

The app is imported by name, then given the settings the test left it with
(task and app options that decide acks, limits and results), the run's
broker, result backend and queue (declared, so ``task_create_missing_queues=
False`` works), and on Redis a short visibility timeout. Its pool children
apply the faults (``child``); this main process applies the two a broker
sees: ``ack_lost`` (the connection dies where the ack would go) and
``redeliver*K`` (the message goes back to the queue instead of being acked).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
from collections.abc import Callable
from typing import Any
from urllib.parse import urlparse

from celery import signals
from kombu.entity import Queue
from kombu.message import Message

from .. import _celery_internals as internals
from ..apps import load_app
from . import child
from .plan import (
    PLAN_ENV,
    RESTORE_SWEEP_EVERY_SECOND,
    Bindings,
    Plan,
    append_record,
    read_records,
)
from .waiting import polls

#: How long an early ack that is to be lost or turned into a redelivery waits for the body's end.
BODY_WAIT_SECONDS = 30.0
#: The worker's log level (its log is in the run's directory); ERROR unless set.
LOGLEVEL_ENV = "CELERY_FAULTS_WORKER_LOGLEVEL"
#: The faults this process applies (the others end a body in the child).
PARENT_FAULTS = ("ack_lost", "redeliver")


def main(argv: list[str]) -> None:
    (settings_path,) = argv
    with open(settings_path, encoding="utf-8") as handle:
        settings = json.load(handle)
    app = load_app(settings["app"])
    queue = settings["queue"]
    apply_settings(app, settings["settings"])
    options = dict(app.conf.broker_transport_options or {})
    options["visibility_timeout"] = float(settings["visibility_timeout"])
    options.update(RESTORE_SWEEP_EVERY_SECOND)
    app.conf.update(
        broker_url=settings["broker_url"],
        result_backend=settings["backend_url"],
        task_default_queue=queue,
        task_queues=[Queue(queue)],
        task_routes=None,
        broker_transport_options=options,
        worker_hijack_root_logger=False,
        # No remote control unless a test asks for it (and then it names this
        # node as the destination: the mailbox exchange is shared by every run's
        # worker on the broker).
        worker_enable_remote_control=bool(settings.get("remote_control", False)),
    )
    ready_path = settings["ready"]

    def ready(**_: object) -> None:
        append_record(ready_path, event="ready", pid=os.getpid())

    hook_acks(os.environ[PLAN_ENV], urlparse(settings["broker_url"]))
    signals.task_received.connect(_received, weak=False)
    signals.worker_process_init.connect(lambda **_: child.install(), weak=False)
    signals.worker_ready.connect(ready, weak=False)
    app.worker_main(
        [
            "worker",
            "--pool=prefork",
            f"--concurrency={int(settings['concurrency'])}",
            f"--queues={queue}",
            f"--hostname={queue}@%h",  # a node name unique to the run
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            f"--loglevel={os.environ.get(LOGLEVEL_ENV, 'ERROR')}",
        ]
    )


def apply_settings(app: Any, settings: dict[str, Any]) -> None:
    """The app's and its tasks' settings as the test left them (``plan.task_settings``)."""
    app.conf.update(settings.get("conf", {}))
    for name, options in settings.get("tasks", {}).items():
        task = app.tasks.get(name)
        if task is None:
            continue
        for option, value in options.items():
            setattr(task, option, value)


def _received(request: Any = None, **_: Any) -> None:
    plan = Plan.read(os.environ[PLAN_ENV])
    append_record(plan.record, event="received", task_id=request.id, task=request.name)


def hook_acks(plan_path: str, broker: Any) -> None:
    """Record each ack this (parent) process sends; lose it or requeue it when planned.

    An early ack is sent when the child reports the job accepted, while the
    child already runs the body: the child waits for the ``acked`` line
    before a fault that kills the whole worker, so the fault lands after the
    ack, where the emulation puts it (``child.ChildFaults.await_early_ack``).
    A lost ack or a redelivery waits for the body's end instead, where the
    emulation puts those.
    """
    original: Callable[..., None] = Message.ack

    def ack(self: Message, multiple: bool = False) -> None:
        headers = self.headers or {}
        task_id, name = str(headers.get("id")), str(headers.get("task"))
        plan = Plan.read(plan_path)
        records = read_records(plan.record)
        delivery = sum(
            r.get("event") == "received" and r.get("task_id") == task_id for r in records
        )
        step = Bindings(plan).steps_for(task_id, name, delivery)
        redeliveries = Bindings(plan).redeliveries_for(name)
        done = sum(
            (r.get("event"), r.get("spec"), r.get("task_id")) == ("fault", "redeliver", task_id)
            for r in records
        )
        if step is not None and step.kind == "ack_lost":
            _await_body_end(plan.record, task_id, delivery)
            if broker.scheme in ("amqp", "pyamqp"):
                how = f"{drop_connections(broker)} connection(s) dropped"
            else:
                internals.lose_ack_on_a_virtual_transport(self)
                how = "the ack was never sent"
            append_record(plan.record, event="fault", task_id=task_id, spec="ack_lost", how=how)
            return
        if done < redeliveries:
            _await_body_end(plan.record, task_id, delivery)
            append_record(plan.record, event="fault", task_id=task_id, spec="redeliver")
            self.reject(requeue=True)
            return
        original(self, multiple=multiple)
        append_record(plan.record, event="acked", task_id=task_id)

    Message.ack = ack  # type: ignore[method-assign]


def _await_body_end(record: str, task_id: str, delivery: int) -> None:
    for _ in polls(BODY_WAIT_SECONDS, interval=0.01):
        ends = sum(
            r.get("task_id") == task_id
            and (
                r.get("event") == "end"
                or (r.get("event") == "fault" and r.get("spec") not in PARENT_FAULTS)
            )
            for r in read_records(record)
        )
        if ends >= delivery:
            return


def drop_connections(broker: Any) -> int:
    """Shut down every socket of this process connected to the broker's port: the connection dies.

    The broker sees the connection drop (RabbitMQ requeues what it held,
    Redis keeps it unacked until restored) and Celery's consumer reconnects.
    """
    port = broker.port or (5672 if broker.scheme in ("amqp", "pyamqp") else 6379)
    dropped = 0
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):
            probe = socket.socket(fileno=os.dup(int(name)))
            try:
                inet = probe.family in (socket.AF_INET, socket.AF_INET6)
                if inet and probe.type == socket.SOCK_STREAM and probe.getpeername()[1] == port:
                    probe.shutdown(socket.SHUT_RDWR)
                    dropped += 1
            finally:
                probe.close()
    return dropped


if __name__ == "__main__":
    main(sys.argv[1:])
