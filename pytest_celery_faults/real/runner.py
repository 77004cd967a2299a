"""Drive a real prefork worker on a real broker through one fault scenario at a time.

The runner starts the worker (``worker_main``) as the leader of a process group
of its own, publishes the scenario's message (or canvas) to a queue unique to
the run, and observes what really happened: the scenario's record file
(receipts, starts, side effects, ends, faults, acks), the result backend, the
worker's death. After a power loss or a shutdown it starts a fresh worker so
redeliveries are consumed. Every wait is bounded. It signals nothing but the
process group it started, and deletes its queue.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from ..grammar import parse_spec
from .plan import (
    LONGEST_TIME_LIMIT,
    PLAN_ENV,
    Plan,
    PlannedSpec,
    RealModeRefused,
    leaves,
    read_records,
)
from .waiting import polls

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED", "IGNORED"})
#: After the last news about a settled task, how long nothing more may happen.
SETTLE_SECONDS = 0.4
#: The same after a fault ended a body, or per worker death: a redelivery may be on its way.
FAULT_SETTLE_SECONDS = 1.5
#: Faults after which the worker's main process always reacts (stores a failure, or requeues),
#: and how long it may take billiard to notice a dead child.
CHILD_KILLS = ("sigkill", "sigterm", "exit", "timeout")
REACTION_SECONDS = 15.0
#: Faults that stop the worker: a scenario with one settles once it has stopped.
SHUTDOWNS = ("warm_shutdown", "cold_shutdown")
#: Which client library each broker scheme needs, and the extra that installs it.
CLIENT_LIBRARIES = {"redis": ("redis", "redis"), "rabbitmq": ("amqp", "rabbitmq")}


class BrokerUnreachable(ConnectionError):
    """The broker URL does not answer, or its client library is missing."""


@dataclass
class DeliveryView:
    """What one delivery of a task did on the worker."""

    body: bool
    effects: list[str]


@dataclass
class RealOutcome:
    """What a real worker did with one task id, as the runner observed it."""

    task_id: str
    executions: int
    state: str
    exception: str | None
    redelivered: list[bool]
    lost: bool
    log: list[dict[str, Any]] = field(default_factory=list)
    result: Any = None
    retries: int = 0
    deliveries: list[DeliveryView] = field(default_factory=list)
    faults: list[str] = field(default_factory=list)
    name: str = "?"

    def timeline(self) -> str:
        return "\n".join(json.dumps(entry, sort_keys=True) for entry in self.log)


def profile_for(url: str) -> str:
    scheme = urlparse(url).scheme
    if scheme in ("amqp", "pyamqp"):
        return "rabbitmq"
    if scheme in ("redis", "rediss"):
        return "redis"
    raise ValueError(f"real-broker mode supports amqp:// and redis:// URLs, not {url!r}")


def check_reachable(url: str, timeout: float = 2.0) -> None:
    profile = profile_for(url)
    module, extra = CLIENT_LIBRARIES[profile]
    try:
        __import__(module)
    except ImportError:
        raise BrokerUnreachable(
            f"{url} needs the {module!r} client library: "
            f"pip install 'pytest-celery-faults[{extra}]'"
        ) from None
    parsed = urlparse(url)
    port = parsed.port or (5672 if profile == "rabbitmq" else 6379)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout).close()
    except OSError as exc:
        raise BrokerUnreachable(f"the broker at {url} does not answer: {exc}") from None


def normalise_exception(text: str | None) -> str | None:
    """Drop what differs between runs by design: billiard's job number."""
    return None if text is None else re.sub(r"Job: \d+\.", "Job: N.", text)


def exception_text(value: Any) -> str | None:
    if not isinstance(value, BaseException):
        return None
    return normalise_exception(f"{type(value).__name__}: {value}")


def frozen_ids(signature: Any) -> list[str]:
    """The task ids a frozen signature or canvas holds, in order."""
    return [str(leaf.options["task_id"]) for leaf in leaves(signature)]


class RealBrokerRunner:
    """One real worker for an app, scenario after scenario. A context manager."""

    def __init__(
        self,
        app_path: str,
        broker_url: str,
        *,
        backend_url: str = "redis://127.0.0.1:6379/15",
        track: tuple[str, ...] | list[str] = (),
        visibility_timeout: float = 10.0,
        startup_timeout: float = 60.0,
        concurrency: int = 1,
        remote_control: bool = False,
    ) -> None:
        self.app_path = app_path
        self.broker_url = broker_url
        self.backend_url = backend_url
        self.profile = profile_for(broker_url)
        self.track = list(track)
        self.visibility_timeout = visibility_timeout
        self.startup_timeout = startup_timeout
        self.concurrency = concurrency
        #: Whether the worker listens to ``app.control`` (its node name: :attr:`node_name`).
        self.remote_control = remote_control
        self.queue = f"celery-faults-{uuid.uuid4().hex[:12]}"
        self.worker: subprocess.Popen[bytes] | None = None
        self.settings: dict[str, Any] = {}
        self.scenarios = 0

    # -- life cycle -------------------------------------------------------------

    def __enter__(self) -> RealBrokerRunner:
        from celery import Celery

        check_reachable(self.broker_url)
        check_reachable(self.backend_url)
        self.directory = tempfile.mkdtemp(prefix="celery-faults-real-")
        self.plan_path = os.path.join(self.directory, "plan.json")
        self.ready_path = os.path.join(self.directory, "ready.jsonl")
        self.record_path = os.path.join(self.directory, "record-0.jsonl")
        Plan(record=self.record_path, track=list(self.track)).write(self.plan_path)
        self.client = Celery("celery-faults-real-client", set_as_current=False)
        self.client.conf.update(
            broker_url=self.broker_url,
            result_backend=self.backend_url,
            task_default_queue=self.queue,
        )
        return self  # the worker starts with the first scenario, with its settings

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_worker()
            self._delete_queue()
        finally:
            self.client.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def start_worker(self) -> None:
        """Start a worker and wait (bounded) until it says it is ready."""
        seen = len(read_records(self.ready_path))
        # The worker imports the app as this process would: same path.
        path = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, **{PLAN_ENV: self.plan_path, "PYTHONPATH": path.strip(os.pathsep)})
        settings_path = os.path.join(self.directory, "worker.json")
        with open(settings_path, "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "app": self.app_path,
                    "broker_url": self.broker_url,
                    "backend_url": self.backend_url,
                    "queue": self.queue,
                    "visibility_timeout": self.visibility_timeout,
                    "concurrency": self.concurrency,
                    "remote_control": self.remote_control,
                    "ready": self.ready_path,
                    "settings": self.settings,
                },
                handle,
            )
        self.log_path = os.path.join(self.directory, "worker.log")
        with open(self.log_path, "ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "pytest_celery_faults.real.worker_main", settings_path],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the only one we signal
            )
        for _ in polls(self.startup_timeout):
            if len(read_records(self.ready_path)) > seen:
                return
            if self.worker.poll() is not None:
                break
        self.stop_worker()
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            tail = handle.read()[-2000:]
        raise RuntimeError(f"the real worker did not become ready:\n{tail}")

    @property
    def node_name(self) -> str:
        """The worker's node name, unique to the run: a ``destination`` for ``app.control``."""
        from celery.utils.nodenames import host_format

        return str(host_format(f"{self.queue}@%h"))

    def stop_worker(self) -> None:
        worker, self.worker = self.worker, None
        if worker is None:
            return
        if worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=15)
        # its pool children share the group; make sure none outlives it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(worker.pid, signal.SIGKILL)

    def use_settings(self, settings: dict[str, Any]) -> None:
        """The app's settings as the test left them; a worker with others is restarted."""
        if settings == self.settings:
            return
        self.settings = settings
        if self.worker is not None:
            self.stop_worker()
            self.start_worker()

    # -- scenarios --------------------------------------------------------------

    def run(
        self,
        task_name: str,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        spec: str | None = None,
        *,
        timeout: float = 45.0,
    ) -> RealOutcome:
        """Publish one message with ``spec`` planned for it; observe until it settles."""
        signature = self.client.signature(task_name, args=args, kwargs=kwargs or {})
        signature.freeze()
        return self.run_signature(signature, [spec] if spec else [], timeout=timeout)[-1]

    def run_signature(
        self,
        signature: Any,
        specs: list[str] | tuple[str, ...] = (),
        *,
        waiting: list[str] | tuple[str, ...] = (),
        timeout: float = 45.0 + LONGEST_TIME_LIMIT,
        tasks: int = 0,
        starts: int = 0,
    ) -> list[RealOutcome]:
        """Publish a frozen signature or canvas; the outcomes of its task ids, in order.

        ``specs`` bind as :meth:`CeleryFaults.run` binds them (a plain signature's
        to its task id when the task matches); ``waiting`` specs bind to the first
        message of a matching name, as armed specs do. ``tasks``: how many task ids
        the run has in all, when bodies publish tasks whose ids are not known in
        advance: it is not over before the worker has received that many.
        ``starts``: how many bodies the run starts in all (redeliveries counted),
        when that is known: it is not over before the worker has started that
        many, however long it goes without news (up to ``timeout``).
        """
        ids = frozen_ids(signature)
        plain = getattr(signature, "subtask_type", None) is None
        planned = []
        for text in specs:
            parsed = parse_spec(text)
            bind_here = plain and not parsed.redeliver and parsed.task in (None, signature.task)
            planned.append(PlannedSpec(str(parsed), ids[0] if bind_here else None))
        planned += [PlannedSpec(str(text)) for text in waiting]
        self.scenarios += 1
        self.record_path = os.path.join(self.directory, f"record-{self.scenarios}.jsonl")
        open(self.record_path, "w").close()
        Plan(record=self.record_path, specs=planned, track=list(self.track)).write(self.plan_path)
        if self.worker is None or self.worker.poll() is not None:
            self.worker = None
            self.start_worker()
        deaths = self._publish_and_wait(signature, ids, timeout, tasks, starts)
        return [self._observe(task_id, deaths) for task_id in self._seen_ids(ids)]

    def _publish_and_wait(
        self, signature: Any, ids: list[str], timeout: float, tasks: int = 0, starts: int = 0
    ) -> int:
        from celery.canvas import Signature
        from kombu.utils.json import dumps, loads

        # Through JSON: from_dict binds the signatures it is given to the client app, and
        # the caller's signature must stay bound to its own (the emulation publishes it next).
        canvas = Signature.from_dict(loads(dumps(signature)), app=self.client)
        canvas.apply_async(queue=self.queue)
        deaths = 0
        # Without news for this long (and nothing settled), what is missing is lost.
        quiet = 3.0 if self.profile == "rabbitmq" else self.visibility_timeout + 4.0
        last_news, seen, settled_at = time.monotonic(), 0, None
        for _ in polls(timeout):
            if self.worker is not None and self.worker.poll() is not None:
                deaths += 1
                self.worker = None
                self.start_worker()
                last_news, settled_at = time.monotonic(), None
            records = read_records(self.record_path)
            if len(records) > seen:
                seen, last_news, settled_at = len(records), time.monotonic(), None
            if deaths == 0 and any(r.get("spec", "").split("@")[0] in SHUTDOWNS for r in records):
                continue  # the worker was told to stop: nothing is settled until it has
            if sum(r["event"] == "start" and r.get("body", True) for r in records) < starts:
                continue  # a body the run is known to start has not started yet
            grace = self._settled(ids, records)
            if len(self._seen_ids(ids, records)) < tasks:
                grace = None  # a task a body published has not been received yet
            if grace is not None:
                settled_at = settled_at or time.monotonic()
                if time.monotonic() - settled_at > max(grace, FAULT_SETTLE_SECONDS * deaths):
                    break
            elif time.monotonic() - last_news > (
                REACTION_SECONDS if not records or self._awaiting_reaction(ids, records) else quiet
            ):
                break  # no record at all yet: the worker may still be reconnecting
        return deaths

    def _settled(self, ids: list[str], records: list[dict[str, Any]]) -> float | None:
        """How long to wait for news before taking the scenario as over; ``None``: not yet.

        Every task id needs a final state (in the backend, or its last end says
        so). After a killed body the backend may already say FAILURE while the
        broker is about to deliver the message again: that takes a longer wait.
        """
        grace = SETTLE_SECONDS
        for task_id in self._seen_ids(ids, records):
            own = [r for r in records if r.get("task_id") == task_id and r["event"] != "bound"]
            if own and own[-1]["event"] == "fault":
                grace = max(grace, FAULT_SETTLE_SECONDS)
                if own[-1]["spec"] == "ack_lost" and self.profile == "redis":
                    # Redis restores it once the visibility timeout has passed (and a sweep ran).
                    grace = self.visibility_timeout + 2.5
            if self.client.AsyncResult(task_id).state in READY_STATES:
                continue
            ends = [r for r in own if r["event"] == "end"]
            if not ends or ends[-1].get("state") not in READY_STATES:
                return None
            starts = [r for r in own if r["event"] == "start"]
            if starts and starts[-1]["delivery"] != ends[-1]["delivery"]:
                return None  # a later delivery is running
        for task_id in self._seen_ids(ids, records):
            own = [r for r in records if r.get("task_id") == task_id]
            if own and own[-1]["event"] == "received":
                return None  # delivered again, waiting for a child
        return grace

    def _awaiting_reaction(self, ids: list[str], records: list[dict[str, Any]]) -> bool:
        """A child was killed under a task (its worker will store a failure or requeue it),
        a message was received and waits for a child (billiard replaces a dead one
        within seconds), or a body is running (it may wait before its next record: a
        loaded machine must not end the scenario in the middle of it)."""
        for task_id in self._seen_ids(ids, records):
            mine = [r for r in records if r.get("task_id") == task_id]
            if mine and mine[-1]["event"] == "received":
                return True
            endings = [r for r in mine if r["event"] in ("start", "end", "fault")]
            if endings and endings[-1]["event"] == "start" and endings[-1].get("body", True):
                return True  # neither ended nor cut short by a fault yet
            own = [r for r in mine if r["event"] in ("start", "fault")]
            last = own[-1] if own else {}
            if last.get("event") == "fault":
                kind = str(last["spec"]).split("@")[0].split("(")[0]
                if kind in CHILD_KILLS and self.client.AsyncResult(task_id).state == "PENDING":
                    return True
        return False

    def _seen_ids(self, ids: list[str], records: list[dict[str, Any]] | None = None) -> list[str]:
        """The canvas's ids, then any other task id the worker received."""
        records = read_records(self.record_path) if records is None else records
        seen = dict.fromkeys(ids)
        for record in records:
            if record.get("event") == "received":
                seen.setdefault(record["task_id"])
        return list(seen)

    def _observe(self, task_id: str, deaths: int) -> RealOutcome:
        log = [r for r in read_records(self.record_path) if r.get("task_id") in (task_id, None)]
        starts = [r for r in log if r["event"] == "start" and r.get("body", True)]
        deliveries: dict[int, DeliveryView] = {}
        for entry in log:
            if entry["event"] == "start":
                view = deliveries.setdefault(entry["delivery"], DeliveryView(False, []))
                view.body = view.body or bool(entry.get("body", True))
            elif entry["event"] == "effect":
                deliveries.setdefault(entry["delivery"], DeliveryView(True, []))
                deliveries[entry["delivery"]].effects.append(entry["label"])
        result = self.client.AsyncResult(task_id)
        state = result.state
        # Cut short: the last start has no end, or an end without a state (cut off).
        ends = [(r["event"], r.get("state")) for r in log if r["event"] in ("start", "end")]
        names = [r["task"] for r in log if r.get("task")]
        value = result.result if state in ("SUCCESS", "FAILURE") else None
        return RealOutcome(
            task_id=task_id,
            executions=len(starts),
            state=state,
            exception=exception_text(result.result),
            redelivered=[bool(r.get("redelivered")) for r in starts],
            lost=state not in READY_STATES and bool(ends) and ends[-1][1] is None,
            log=log,
            result=value if state == "SUCCESS" else None,
            retries=max((int(r.get("retries") or 0) for r in starts), default=0),
            deliveries=[deliveries[number] for number in sorted(deliveries)],
            faults=[r["spec"] for r in log if r["event"] == "fault"],
            name=names[0] if names else "?",
        )

    # -- queues -----------------------------------------------------------------

    def _delete_queue(self) -> None:
        """Remove the run's queue and exchange (and, on Redis, kombu's keys that name them)."""
        with contextlib.suppress(Exception), self.client.connection_for_write() as connection:
            channel = connection.default_channel
            channel.queue_delete(self.queue)
            if self.profile == "rabbitmq":
                channel.exchange_delete(self.queue)
            if self.profile == "redis":
                channel.client.delete(
                    self.queue,
                    f"_kombu.binding.{self.queue}",
                    f"_kombu.binding_permanent.{self.queue}",
                )


__all__ = ["RealBrokerRunner", "RealModeRefused", "RealOutcome", "BrokerUnreachable"]
