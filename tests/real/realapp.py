"""The app the conformance suite runs on a real worker and in the emulation alike."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from celery import Celery, Task
from celery.exceptions import Ignore, Reject

app = Celery("realapp", set_as_current=False)
app.conf.worker_prefetch_multiplier = 1
#: Short real limits, so the ack table's time-limit column costs seconds.
LIMITS = {"time_limit": 2, "soft_time_limit": 1}


def effect(n: int) -> None:
    """A tracked side effect: faults fire after it."""


def _two_effects(task: Any, ending: str) -> str:
    """A side effect, then the ending asked for (the ack table's body endings), then another."""
    effect(1)
    redelivered = (task.request.delivery_info or {}).get("redelivered")
    if ending == "exception":
        raise ValueError("boom")
    if ending == "retry" and task.request.retries == 0:
        raise task.retry(countdown=1)  # real seconds on a real worker
    if ending == "reject_requeue" and not redelivered:
        raise Reject("again", requeue=True)
    if ending == "reject_drop":
        raise Reject("never", requeue=False)
    if ending == "ignore":
        raise Ignore()
    effect(2)
    return "done"


#: The ack table's rows: acks_late / reject_on_worker_lost / acks_on_failure_or_timeout.
CONFIGURATIONS: dict[str, dict[str, bool]] = {
    "early": {},
    "late": {"acks_late": True},
    "late_drop": {"acks_late": True, "acks_on_failure_or_timeout": False},
    "late_requeue": {"acks_late": True, "reject_on_worker_lost": True},
    "late_requeue_drop": {
        "acks_late": True,
        "reject_on_worker_lost": True,
        "acks_on_failure_or_timeout": False,
    },
}


def _configured(name: str, options: dict[str, Any]) -> Task:
    def body(self: Task, ending: str = "success") -> str:
        return _two_effects(self, ending)

    body.__name__ = body.__qualname__ = name
    return app.task(name=f"realapp.{name}", bind=True, shared=False, **options)(body)  # type: ignore[no-any-return]


# Each configuration twice: without time limits (a killed child is reported as lost
# at once) and `_timed`, with short real limits for the time-limit scenarios.
for _name, _options in CONFIGURATIONS.items():
    globals()[_name] = _configured(_name, _options)
    globals()[f"{_name}_timed"] = _configured(f"{_name}_timed", {**_options, **LIMITS})


@app.task(name="realapp.quiet", acks_late=True, ignore_result=True, shared=False)
def quiet() -> None:
    """A task whose result is never stored: only the worker's records tell how it ended."""
    effect(1)


@app.task(name="realapp.threaded", acks_late=True, reject_on_worker_lost=True, shared=False)
def threaded() -> str:
    """Its first side effect runs on another thread (``asyncio.to_thread``), the second inline."""
    asyncio.run(asyncio.to_thread(effect, 1))
    effect(2)
    return "threaded"


@app.task(name="realapp.pickled", serializer="pickle", shared=False)
def pickled() -> str:
    """Sent with pickle, which the app does not accept: the worker refuses the message."""
    effect(1)
    return "pickled"


@app.task(name="realapp.collect", shared=False)
def collect(results: list[Any]) -> int:
    """A chord's body."""
    effect(1)
    return len(results)


@app.task(name="realapp.failing", acks_late=True, shared=False)
def failing() -> str:
    effect(1)
    raise ValueError("boom")


# -- real-worker confirmations for the execution model -------------------------------

#: Where the confirmation tasks keep their state (a database of their own).
STATE_URL = "redis://127.0.0.1:6379/12"


def state() -> Any:
    import redis

    return redis.Redis.from_url(STATE_URL, decode_responses=True)


@app.task(name="realapp.locked_charge", acks_late=True, reject_on_worker_lost=True, shared=False)
def locked_charge(key: str) -> str:
    """Charges under a ``SET NX`` lock released in ``finally``; a held lock skips the work."""
    store = state()
    if not store.set(f"{key}:lock", "held", nx=True, ex=60):
        store.rpush(f"{key}:log", "skipped")
        return "skipped"
    try:
        store.rpush(f"{key}:log", "charged")
        effect(1)
        return "charged"
    finally:
        store.delete(f"{key}:lock")


@app.task(name="realapp.sleepy", soft_time_limit=1, time_limit=10, shared=False)
def sleepy() -> str:
    """Sleeps past its declared soft time limit."""
    time.sleep(3)
    return "woke"


@app.task(name="realapp.check_then_charge", shared=False)
def check_then_charge(key: str) -> str:
    """Checks that nothing was charged, then charges: not safe against a concurrent duplicate.

    Both duplicates check before either acts: each waits (bounded) until the other
    has arrived, which only happens when two children run them at the same time.
    """
    store = state()
    if store.get(f"{key}:charged"):
        return "already charged"
    store.incr(f"{key}:arrived")
    deadline = time.monotonic() + 10
    while int(store.get(f"{key}:arrived") or 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    store.incr(f"{key}:charges")
    store.set(f"{key}:charged", "yes")
    return "charged"


@app.task(name="realapp.cleaned_up", shared=False)
def cleaned_up(key: str) -> str:
    """Says it started, waits (bounded) for its end, and logs its cleanup in ``finally``."""
    store = state()
    try:
        store.rpush(f"{key}:log", "started")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not store.get(f"{key}:stop"):
            time.sleep(0.05)
        store.rpush(f"{key}:log", "finished")
        return "finished"
    finally:
        store.rpush(f"{key}:log", "cleanup")


@app.task(name="realapp.terminator", shared=False)
def terminator(task_id: str, how: str) -> None:
    """Revokes ``task_id`` and kills the child running it, a second after it starts."""
    time.sleep(1)
    app.control.revoke(task_id, terminate=True, signal=how)


# -- the consumer: prefetch slots and messages published during an execution ----------


def _await_received(task_id: str, seconds: float = 3.0) -> None:
    """On a real worker: wait (bounded) until its main process has received ``task_id``.

    A message a body publishes reaches the main process within milliseconds if
    its consumer has room; the fault after this wait then lands after that, not in
    a race with it. No room (the prefetch count is full): the wait runs out. In the
    emulation (no plan in the environment) the consumer has taken it at the publish.
    """
    import os

    from pytest_celery_faults.real.plan import PLAN_ENV, Plan, read_records

    path = os.environ.get(PLAN_ENV)
    if path is None:
        return
    record = Plan.read(path).record
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for entry in read_records(record):
            if entry.get("event") == "received" and entry.get("task_id") == task_id:
                return
        time.sleep(0.02)


@app.task(name="realapp.spawned", shared=False)
def spawned() -> str:
    """The task a spawner publishes."""
    return "spawned"


def _spawn() -> str:
    child = spawned.delay()  # side effect 1
    _await_received(child.id)
    effect(2)  # side effect 2
    return "spawner"


@app.task(name="realapp.spawner", shared=False)
def spawner() -> str:
    """Early ack: publishes a task, then another side effect."""
    return _spawn()


@app.task(name="realapp.spawner_late", acks_late=True, shared=False)
def spawner_late() -> str:
    """acks_late: publishes a task, then another side effect."""
    return _spawn()


@app.task(name="realapp.locked_past_its_limit", time_limit=1, shared=False)
def locked_past_its_limit(key: str, cleanup_takes: float = 0.0) -> str:
    """Holds a lock past its hard time limit; ``finally`` releases it after ``cleanup_takes``."""
    store = state()
    store.set(f"{key}:lock", "held", ex=60)
    try:
        time.sleep(5)
        return "finished"
    finally:
        time.sleep(cleanup_takes)
        store.delete(f"{key}:lock")


@app.task(name="realapp.ends_its_process", shared=False)
def ends_its_process(how: str) -> str:
    """Ends (or signals) its own process the way ``how`` names."""
    import os
    import signal

    if how == "os._exit(0)":
        os._exit(0)
    if how == "os._exit(3)":
        os._exit(3)
    if how in ("SIGTERM", "SIGHUP", "SIGKILL"):
        os.kill(os.getpid(), getattr(signal, how))
    return "survived"


# -- the consumer: requeue order, recycling --------------------------------------------


def _await_received_count(name: str, count: int, seconds: float = 60.0) -> None:
    """On a real worker: wait (bounded) until its main process has received ``count``
    messages of task ``name`` in this scenario: they are all prefetched, unacked.
    In the emulation (no plan in the environment) the consumer took them at the publish."""
    import os

    from pytest_celery_faults.real.plan import PLAN_ENV, Plan, read_records

    path = os.environ.get(PLAN_ENV)
    if path is None:
        return
    record = Plan.read(path).record
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        received = {
            entry.get("task_id")
            for entry in read_records(record)
            if entry.get("event") == "received" and entry.get("task") == name
        }
        if len(received) >= count:
            return
        time.sleep(0.02)


def _note_unacked(key: str) -> None:
    """On a real worker on Redis: keep kombu's unacked index as it stands (task id, delivery
    tag, score), the order its restore sweep will use, under ``{key}:unacked``."""
    import json
    import os

    import redis
    from kombu.transport.redis import Channel

    from pytest_celery_faults.real.plan import PLAN_ENV

    url = str(app.conf.broker_url or "")
    if os.environ.get(PLAN_ENV) is None or not url.startswith("redis"):
        return
    broker = redis.Redis.from_url(url, decode_responses=True)
    try:
        rows = []
        for tag, score in broker.zrange(Channel.unacked_index_key, 0, -1, withscores=True):
            raw = broker.hget(Channel.unacked_key, tag)
            if raw:
                payload = json.loads(raw)[0]
                rows.append([payload["headers"]["id"], tag, score])
        state().set(f"{key}:unacked", json.dumps(rows))
    finally:
        broker.close()


@app.task(name="realapp.ordered", bind=True, acks_late=True, shared=False)
def ordered(self: Task, key: str, n: int, of: int) -> int:
    """Logs its place ``n`` and whether it came redelivered, then a side effect.

    The first, on its first delivery, waits until the worker holds all ``of``
    messages (prefetched, unacked), so a power loss after its side effect finds
    them all delivered.
    """
    redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
    if n == 0 and not redelivered:
        _await_received_count(str(self.name), of)
        _note_unacked(key)
    state().rpush(f"{key}:order", f"{n}:{int(redelivered)}")
    effect(1)
    return n


#: What a child keeps between its tasks: a thread-local and a module-level counter.
_child_local = threading.local()
_module_runs = 0


@app.task(name="realapp.counted", bind=True, shared=False)
def counted(self: Task) -> dict[str, int]:
    """How many tasks this child ran (a thread-local and a module global say), and its pid
    as ``os.getpid()`` and as the worker's ``inspect().active()`` says (Celery's
    ``worker_pid``, which a recycled child changes)."""
    import os

    global _module_runs
    _module_runs += 1
    _child_local.runs = getattr(_child_local, "runs", 0) + 1
    hostname = str(self.request.hostname)
    replies = app.control.inspect(destination=[hostname], limit=1, timeout=20).active() or {}
    [worker_pid] = [r["worker_pid"] for r in replies[hostname] if r["id"] == self.request.id]
    return {
        "pid": os.getpid(),
        "worker_pid": int(worker_pid),
        "thread_local": int(_child_local.runs),
        "module": _module_runs,
    }
