"""Drive a real prefork worker on a real broker through one fault scenario at a time.

The runner starts the worker (``worker_main``) as the leader of a process group
of its own, publishes the scenario's message to a queue unique to the run,
and observes what really happened: the child's record file (starts, side
effects, faults), the result backend, the worker's death. After a power loss
it starts a fresh worker so the redelivery is consumed. Every wait is bounded.
It signals nothing but the process group it started, and deletes its queue.
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

from celery import Celery

from .child import PLAN_ENV
from .waiting import polls

READY_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED", "REJECTED", "IGNORED"})


class BrokerUnreachable(ConnectionError):
    """The broker URL does not answer."""


@dataclass
class RealOutcome:
    """What a real worker did with one message, as the runner observed it."""

    task_id: str
    executions: int
    state: str
    exception: str | None
    redelivered: list[bool]
    lost: bool
    worker_deaths: int
    log: list[dict[str, Any]] = field(default_factory=list)

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
    parsed = urlparse(url)
    port = parsed.port or (5672 if profile_for(url) == "rabbitmq" else 6379)
    try:
        socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout).close()
    except OSError as exc:
        raise BrokerUnreachable(f"the broker at {url} does not answer: {exc}") from None


def normalise_exception(text: str | None) -> str | None:
    """Drop what differs between runs by design: billiard's job number."""
    return None if text is None else re.sub(r"Job: \d+\.", "Job: N.", text)


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
    ) -> None:
        self.app_path = app_path
        self.broker_url = broker_url
        self.backend_url = backend_url
        self.profile = profile_for(broker_url)
        self.track = list(track)
        self.visibility_timeout = visibility_timeout
        self.startup_timeout = startup_timeout
        self.queue = f"celery-faults-{uuid.uuid4().hex[:12]}"
        self.worker: subprocess.Popen[bytes] | None = None

    # -- life cycle -------------------------------------------------------------

    def __enter__(self) -> RealBrokerRunner:
        check_reachable(self.broker_url)
        check_reachable(self.backend_url)
        self.directory = tempfile.mkdtemp(prefix="celery-faults-real-")
        self.plan_path = os.path.join(self.directory, "plan.json")
        self.record_path = os.path.join(self.directory, "record.jsonl")
        open(self.record_path, "w").close()
        self._write_plan(None, None)
        self.client = Celery("celery-faults-real-client", set_as_current=False)
        self.client.conf.update(broker_url=self.broker_url, result_backend=self.backend_url)
        self.start_worker()
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.stop_worker()
            self._delete_queue()
        finally:
            self.client.close()
            shutil.rmtree(self.directory, ignore_errors=True)

    def start_worker(self) -> None:
        """Start a worker and wait (bounded) until it says it is ready."""
        seen = len(self._records())
        # The worker imports the app as this process would: same path.
        path = os.pathsep.join([p for p in sys.path if p] + [os.environ.get("PYTHONPATH", "")])
        env = dict(os.environ, **{PLAN_ENV: self.plan_path, "PYTHONPATH": path.strip(os.pathsep)})
        arguments = [
            self.app_path,
            self.broker_url,
            self.backend_url,
            self.queue,
            str(self.visibility_timeout),
        ]
        self.log_path = os.path.join(self.directory, "worker.log")
        with open(self.log_path, "ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "pytest_celery_faults.real.worker_main", *arguments],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the only one we signal
            )
        for _ in polls(self.startup_timeout):
            if any(r.get("event") == "ready" for r in self._records()[seen:]):
                return
            if self.worker.poll() is not None:
                break
        self.stop_worker()
        with open(self.log_path, encoding="utf-8", errors="replace") as handle:
            tail = handle.read()[-2000:]
        raise RuntimeError(f"the real worker did not become ready:\n{tail}")

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
        task_id = str(uuid.uuid4())
        self._write_plan(task_id, spec)
        first_record = len(self._records())
        deaths = 0
        self.client.send_task(task_name, args, kwargs or {}, task_id=task_id, queue=self.queue)
        result = self.client.AsyncResult(task_id)
        # After this long without news (and no result), the message is taken as lost.
        quiet = 10.0 if self.profile == "rabbitmq" else self.visibility_timeout + 7.0
        last_news = time.monotonic()
        seen = first_record
        settled_at: float | None = None
        for _ in polls(timeout):
            if self.worker is not None and self.worker.poll() is not None:
                deaths += 1
                self.worker = None
                self.start_worker()
                last_news = time.monotonic()
            records = self._records()
            if len(records) > seen:
                seen, last_news, settled_at = len(records), time.monotonic(), None
            state = result.state
            if state in READY_STATES:
                settled_at = settled_at or time.monotonic()
                if time.monotonic() - settled_at > 1.0:  # nothing ran it again meanwhile
                    break
            elif time.monotonic() - last_news > quiet:
                break
        return self._observe(task_id, first_record, deaths, result)

    def _observe(self, task_id: str, first: int, deaths: int, result: Any) -> RealOutcome:
        log = [r for r in self._records()[first:] if r.get("task_id") in (task_id, None)]
        starts = [
            r
            for r in log
            if r.get("event") == "start" and r.get("task_id") == task_id and r.get("body", True)
        ]
        state = result.state
        exception = None
        if state == "FAILURE":
            value = result.result
            exception = normalise_exception(f"{type(value).__name__}: {value}")
        return RealOutcome(
            task_id=task_id,
            executions=len(starts),
            state=state,
            exception=exception,
            redelivered=[bool(r.get("redelivered")) for r in starts],
            lost=state not in READY_STATES,
            worker_deaths=deaths,
            log=log,
        )

    # -- files and queues -------------------------------------------------------

    def _write_plan(self, task_id: str | None, spec: str | None) -> None:
        plan = {
            "task_id": task_id,
            "spec": spec,
            "track": list(self.track),
            "record": self.record_path,
        }
        temporary = self.plan_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(plan, handle)
        os.replace(temporary, self.plan_path)  # the child never reads half a plan

    def _records(self) -> list[dict[str, Any]]:
        with open(self.record_path, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]

    def _delete_queue(self) -> None:
        """Remove the run's queue (and, on Redis, kombu's keys that name it)."""
        with contextlib.suppress(Exception), self.client.connection_for_write() as connection:
            channel = connection.default_channel
            channel.queue_delete(self.queue)
            if self.profile == "redis":
                client = channel.client
                client.delete(
                    self.queue,
                    f"_kombu.binding.{self.queue}",
                    f"_kombu.binding_permanent.{self.queue}",
                )
