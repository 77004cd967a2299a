"""Broker profiles: when a broker gives unacked messages back, and to whom.

RabbitMQ returns a consumer's unacked messages the moment its connection drops.
Redis and SQS keep a delivered message invisible for ``visibility_timeout``
seconds after its delivery, whatever the consumer does: a dead worker's messages
come back only then, and a message held longer than that (an ETA or countdown
waiting in the worker) is delivered a second time while the first copy waits.
SQS makes it visible at that instant; on Redis a consumer's restore sweep does
it, and kombu sweeps when a connection comes up and then every
``unacked_restore_interval`` x ``unacked_restore_throttle`` seconds (100 s by
default), so the message comes back at the first sweep after the timeout.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.app.defaults import NAMESPACES

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults._celery_internals import redis_restore_cadence
from pytest_celery_faults.engine.broker import BrokerEvent

#: (argument, delivery_info['redelivered']) for each time a task body started.
seen: list[tuple[int, bool]] = []


def effect() -> None:
    """A tracked side effect."""


def make_task(app: Celery, **options: Any) -> Any:
    @app.task(name="profiles.job", bind=True, shared=False, **options)
    def job(self: Any, n: int) -> int:
        seen.append((n, bool(self.request.delivery_info.get("redelivered"))))
        effect()
        return n

    return job


@pytest.fixture(autouse=True)
def _clear() -> None:
    seen.clear()


def events(faults: CeleryFaults, task_id: str, *kinds: str) -> list[BrokerEvent]:
    return [e for e in faults.ledger.for_task(task_id) if e.kind in kinds]


def since_start(faults: CeleryFaults, event: BrokerEvent) -> float:
    return event.time - faults.clock.start


#: Worker settings the installed Celery reads (``worker_eta_task_limit`` and
#: ``worker_disable_prefetch`` arrived in 5.5).
WORKER_SETTINGS = NAMESPACES["worker"]

#: kombu's Redis transport options that make every restore call a sweep, once a second.
SWEEP_EVERY_SECOND = {"unacked_restore_interval": 1, "unacked_restore_throttle": 1}
#: Whether the installed kombu reads them (5.7 on); before, its sweeps stay 100 s apart.
KOMBU_READS_CADENCE = redis_restore_cadence(SWEEP_EVERY_SECOND) == (1.0, 1)


# -- a worker that loses power ---------------------------------------------------


def test_rabbitmq_restores_at_once_when_the_connection_drops(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(1), "power_loss@1")
        assert faults.clock.elapsed == 0.0  # the clock never moved
        restored = events(faults, outcome.task_id, "restored")
    assert [(e.detail, since_start(faults, e)) for e in restored] == [("connection lost", 0.0)]
    assert seen == [(1, False), (1, True)]
    assert (outcome.deliveries, outcome.state, outcome.lost) == (2, "SUCCESS", False)


@pytest.mark.parametrize(
    ("profile", "timeout", "back_at", "how"),
    [
        ("sqs", 90.0, 90.0, "passed"),  # visible again at the instant
        ("redis", 45.0, 100.0, "passed, restore sweep"),  # the first sweep after it
        ("redis", 200.0, 200.0, "passed, restore sweep"),  # sweeps at 0, 100, 200, ...
    ],
)
def test_visibility_timeout_profiles_restore_only_after_it(
    app: Celery, profile: str, timeout: float, back_at: float, how: str
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": timeout}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(1), "power_loss@1")
        assert faults.clock.elapsed == back_at
        kinds = events(faults, outcome.task_id, "delivered", "orphaned", "restored", "acked")
    # unacked on the dead connection at t=0, back in the queue at back_at, not before
    assert [(e.kind, since_start(faults, e)) for e in kinds] == [
        ("delivered", 0.0),
        ("orphaned", 0.0),
        ("restored", back_at),
        ("delivered", back_at),
        ("acked", back_at),
    ]
    assert kinds[2].detail == f"visibility_timeout={timeout:g}s {how}"
    assert seen == [(1, False), (1, True)]
    assert (outcome.deliveries, outcome.state) == (2, "SUCCESS")


@pytest.mark.parametrize(("profile", "default"), [("redis", 3600.0), ("sqs", 1800.0)])
def test_without_the_option_the_transports_default_visibility_timeout_applies(
    app: Celery, profile: str, default: float
) -> None:
    # kombu.transport.redis.Channel.visibility_timeout = 3600;
    # kombu.transport.SQS.Channel.default_visibility_timeout = 1800
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        faults.run(task.s(1), "power_loss@1")
        assert faults.clock.elapsed == default


@pytest.mark.parametrize(
    ("profile", "sweeps", "elapsed"),
    [
        ("rabbitmq", {}, 0.0),
        ("redis", {}, 100.0),
        ("redis", SWEEP_EVERY_SECOND, 20.0 if KOMBU_READS_CADENCE else 100.0),
    ],
)
def test_a_lost_ack_redelivers_at_once_on_rabbitmq_and_after_the_timeout_on_redis(
    app: Celery, profile: str, sweeps: dict[str, int], elapsed: float
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 20, **sweeps}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(1), "ack_lost")
        assert faults.clock.elapsed == elapsed
        redelivery = events(faults, outcome.task_id, "delivered")[1]
    assert (redelivery.detail, since_start(faults, redelivery)) == ("redelivered=True", elapsed)
    assert seen == [(1, False), (1, True)]  # the body ran twice
    assert (outcome.deliveries, outcome.executions, outcome.acked) == (2, 2, True)


# -- an ETA held longer than the visibility timeout ------------------------------


@pytest.mark.parametrize("profile", ["redis", "sqs"])
@pytest.mark.parametrize("acks_late", [False, True], ids=["early-ack", "acks_late"])
@pytest.mark.parametrize(
    ("countdown", "runs"),
    [(5, [(7, False)]), (15, [(7, False), (7, True)]), (25, [(7, False), (7, True), (7, True)])],
    ids=["within", "beyond-once", "beyond-twice"],
)
def test_redis_runs_an_eta_held_beyond_the_visibility_timeout_again(
    app: Celery, profile: str, acks_late: bool, countdown: int, runs: list[tuple[int, bool]]
) -> None:
    # The worker holds an ETA message unacked until it is due (even with early ack: that
    # ack comes when the pool accepts it). Each visibility timeout that passes meanwhile
    # restores it (Redis: in a sweep, here one a second), and the worker receives one
    # more copy.
    app.conf.broker_transport_options = {"visibility_timeout": 10, **SWEEP_EVERY_SECOND}
    if profile == "redis" and not KOMBU_READS_CADENCE:
        runs = runs[:1]  # kombu before 5.7 sweeps first at 100 s: after the countdown
    task = make_task(app, acks_late=acks_late)
    with CeleryFaults(app, profile=profile) as faults:
        result = task.apply_async((7,), countdown=countdown)
        faults.drain()
        outcome = faults.outcome(result.id)
        restored = events(faults, result.id, "restored")
        assert faults.clock.elapsed == pytest.approx(countdown, abs=1e-3)
    assert seen == runs
    assert [since_start(faults, e) for e in restored] == [10.0, 20.0][: len(runs) - 1]
    assert outcome.deliveries == outcome.executions == len(runs)
    assert outcome.state == "SUCCESS"


@pytest.mark.parametrize(
    ("countdown", "runs", "restored_at"),
    [(12, [(7, False)], []), (150, [(7, False), (7, True)], [100.0])],
    ids=["before-the-next-sweep", "past-one-sweep"],
)
def test_redis_restores_an_eta_only_in_its_sweeps_by_default(
    app: Celery, countdown: int, runs: list[tuple[int, bool]], restored_at: list[float]
) -> None:
    # Measured on a real worker (kombu 5.7, default sweeps): a 12 s countdown under a
    # 5 s visibility timeout runs once; the first sweep after the start is at 100 s.
    app.conf.broker_transport_options = {"visibility_timeout": 5}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile="redis") as faults:
        result = task.apply_async((7,), countdown=countdown)
        faults.drain()
        outcome = faults.outcome(result.id)
        restored = events(faults, result.id, "restored")
        assert faults.clock.elapsed == pytest.approx(countdown, abs=1e-3)
    assert [since_start(faults, e) for e in restored] == restored_at
    assert seen == runs
    assert outcome.deliveries == outcome.executions == len(runs)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"unacked_restore_interval": "often"}, "'unacked_restore_interval'"),
        ({"unacked_restore_throttle": None}, "'unacked_restore_throttle'"),
    ],
)
def test_a_restore_cadence_that_is_not_a_number_is_refused(
    app: Celery, options: dict[str, Any], message: str
) -> None:
    app.conf.broker_transport_options = options
    if not KOMBU_READS_CADENCE:  # kombu before 5.7 has no such options: it ignores them
        assert redis_restore_cadence(options) == (10.0, 10)
        with CeleryFaults(app, profile="redis"):
            return
    with pytest.raises(ValueError, match=message):
        CeleryFaults(app, profile="redis").start()


def test_rabbitmq_holds_an_eta_without_duplicating_it(app: Celery) -> None:
    task = make_task(app, acks_late=True)
    with CeleryFaults(app) as faults:
        result = task.apply_async((7,), countdown=25)
        faults.drain()
        outcome = faults.outcome(result.id)
        assert faults.clock.elapsed == pytest.approx(25, abs=1e-3)
        assert events(faults, result.id, "restored") == []
    assert seen == [(7, False)]
    assert (outcome.deliveries, outcome.executions) == (1, 1)


# -- several workers -------------------------------------------------------------


@pytest.mark.parametrize(("profile", "elapsed"), [("rabbitmq", 0.0), ("redis", 100.0)])
def test_a_redelivered_message_goes_to_a_live_worker(
    app: Celery, profile: str, elapsed: float
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 30}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile, workers=2, seed=3) as faults:
        faults.track(f"{__name__}.effect")
        outcome = faults.run(task.s(1), "power_loss@1")
        first, second = faults.records
        delivered = events(faults, outcome.task_id, "delivered")
        alive = {worker.hostname: worker.alive for worker in faults.workers}
        assert faults.clock.elapsed == elapsed
    assert (first.ended, second.ended) == ("power lost", "returned")
    # delivered to the worker that died, then to the other one, which ran it
    assert [e.consumer for e in delivered] == [first.worker, second.worker]
    first_host, second_host = (record.worker.split("#")[0] for record in (first, second))
    assert first_host != second_host  # another worker, not the dead one restarted
    assert alive == {first_host: False, second_host: True}
    assert seen == [(1, False), (1, True)]
    assert (outcome.deliveries, outcome.state) == (2, "SUCCESS")


# -- prefetched messages ---------------------------------------------------------


@pytest.mark.parametrize(("profile", "elapsed"), [("rabbitmq", 0.0), ("redis", 100.0)])
def test_prefetched_messages_of_a_dead_worker_come_back_redelivered(
    app: Celery, profile: str, elapsed: float
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        faults.inject("profiles.job:power_loss@0")
        results = [task.delay(n) for n in range(3)]
        faults.drain()
        outcomes = [faults.outcome(result.id) for result in results]
        ledgers = [faults.ledger.for_task(result.id) for result in results]
        runs = [[r.ended for r in faults.records if r.task_id == res.id] for res in results]
        dying = faults.records[0].worker
        assert faults.clock.elapsed == elapsed
    # the worker held all three (prefetch 4) when it lost power in the first one; the
    # other two never started there
    assert runs == [["power lost", "returned"], ["returned"], ["returned"]]
    for ledger in ledgers:
        delivered = [e for e in ledger if e.kind == "delivered"]
        assert delivered[0].consumer == dying
        assert delivered[1].consumer != dying
        assert [e.detail for e in delivered] == ["", "redelivered=True"]
        restored = next(e for e in ledger if e.kind == "restored")
        assert since_start(faults, restored) == elapsed
    # messages 1 and 2 never started before the power loss: their bodies ran once each,
    # on the redelivery
    assert sorted(seen) == [(0, True), (1, True), (2, True)]
    # (power_loss@0 fires before message 0's body: its first delivery is no execution)
    assert [(o.deliveries, o.executions, o.state) for o in outcomes] == [
        (2, 1, "SUCCESS"),
        (2, 1, "SUCCESS"),
        (2, 1, "SUCCESS"),
    ]


def test_early_acked_message_is_lost_with_power_but_prefetched_ones_are_not(app: Celery) -> None:
    task = make_task(app)
    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        faults.inject("profiles.job:power_loss@0")
        first, second = task.delay(1), task.delay(2)
        faults.drain()
        lost, kept = faults.outcome(first.id), faults.outcome(second.id)
        kept_deliveries = events(faults, second.id, "delivered")
    assert (lost.lost, lost.state, lost.deliveries, lost.acked) == (True, "PENDING", 1, True)
    assert [e.detail for e in kept_deliveries] == ["", "redelivered=True"]
    assert (kept.state, kept.deliveries, kept.executions, kept.lost) == ("SUCCESS", 2, 1, False)
    assert seen == [(2, True)]  # message 1's body never ran: power_loss@0


@pytest.mark.parametrize("profile", ["rabbitmq", "redis"])
@pytest.mark.parametrize(
    ("acks_late", "bystander"), [(True, [""]), (False, ["", "redelivered=True"])]
)
def test_a_running_message_holds_its_prefetch_slot_until_it_is_acked(
    app: Celery, profile: str, acks_late: bool, bystander: list[str]
) -> None:
    """Multiplier 1, concurrency 1: basic.qos (and kombu's Redis QoS) count delivered,
    unacked messages. Under acks_late the running message fills the slot: the second
    one is never fetched before the power loss, and is delivered once, fresh. An early
    ack frees the slot as it is sent: the second one is prefetched, and comes back
    redelivered."""
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    task = make_task(app, acks_late=acks_late)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        faults.inject("profiles.job:power_loss@1")
        first, second = task.delay(1), task.delay(2)
        faults.drain()
        crashed, kept = faults.outcome(first.id), faults.outcome(second.id)
        fetched = [e.detail for e in events(faults, second.id, "delivered")]
    assert crashed.deliveries == (2 if acks_late else 1)
    assert fetched == bystander
    assert (kept.executions, kept.state) == (1, "SUCCESS")
    assert (2, len(bystander) > 1) in seen


@pytest.mark.parametrize(("multiplier", "waiting"), [(1, 6), (2, 4)])
def test_running_acks_late_messages_count_against_the_prefetch_count(
    app: Celery, multiplier: int, waiting: int
) -> None:
    """Concurrency 2: the consumer holds 2 x multiplier unacked messages, the two
    running ones included; the rest stay in the queue while they run."""
    app.conf.worker_prefetch_multiplier = multiplier
    app.conf.worker_concurrency = 2
    in_queue: list[int] = []

    @app.task(name="profiles.counting", shared=False, acks_late=True)
    def counting() -> None:
        in_queue.append(faults.broker.ready_count())

    with CeleryFaults(app) as faults:
        for _ in range(8):
            counting.delay()
        faults.drain()
    assert in_queue[0] == waiting


@pytest.mark.parametrize(
    ("profile", "waiting"),
    [("redis", 6 if "disable_prefetch" in WORKER_SETTINGS else 0), ("rabbitmq", 0)],
)
def test_worker_disable_prefetch_takes_only_what_the_children_can_run_on_redis(
    app: Celery, profile: str, waiting: int
) -> None:
    """Celery's ``worker_disable_prefetch`` (Redis only: it warns and ignores it on
    other brokers): the consumer takes a message only while fewer requests than
    children are reserved, whatever the prefetch count allows."""
    app.conf.worker_prefetch_multiplier = 4
    app.conf.worker_concurrency = 2
    app.conf.worker_disable_prefetch = True
    in_queue: list[int] = []

    @app.task(name="profiles.counting", shared=False, acks_late=True)
    def counting() -> None:
        in_queue.append(faults.broker.ready_count())

    with CeleryFaults(app, profile=profile) as faults:
        for _ in range(8):
            counting.delay()
        faults.drain()
    assert in_queue[0] == waiting


@pytest.mark.parametrize(
    ("limit", "plain_at"),
    [(None, 0.0), (2, 30.0 if "eta_task_limit" in WORKER_SETTINGS else 0.0)],
)
def test_messages_held_for_their_eta_raise_the_prefetch_count(
    app: Celery, limit: int | None, plain_at: float
) -> None:
    """Celery's strategy raises the count by one per ETA message it holds
    (``qos.increment_eventually``), up to ``worker_eta_task_limit``: with
    multiplier 1, three countdown messages do not keep a plain one waiting;
    under a cap of 2 the consumer stops after two of them, and the plain one
    waits in the queue until a countdown ends."""
    app.conf.worker_prefetch_multiplier = 1
    app.conf.worker_eta_task_limit = limit
    started: dict[int, float] = {}

    @app.task(name="profiles.timed", shared=False, acks_late=True)
    def timed(n: int) -> None:
        started[n] = faults.clock.elapsed

    with CeleryFaults(app) as faults:
        for n in range(3):
            timed.apply_async((n,), countdown=30)
        timed.delay(3)
        faults.drain()
    assert started == {3: plain_at, 0: 30.0, 1: 30.0, 2: 30.0}


# -- the consumer keeps consuming while children run --------------------------------


@pytest.mark.parametrize("profile", ["rabbitmq", "redis"])
def test_a_message_a_body_publishes_is_fetched_at_the_publish(app: Celery, profile: str) -> None:
    """An early-acked body publishes a task, then the worker loses power: the main
    process took the new message at the publish (its slot was free), so it comes
    back redelivered, and runs once."""
    app.conf.worker_prefetch_multiplier = 1
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    job = make_task(app)

    @app.task(name="profiles.parent", shared=False)
    def parent() -> None:
        job.delay(7)

    with CeleryFaults(app, profile=profile) as faults:
        outcome = faults.run(parent.s(), "power_loss@1")
        [child] = [o for o in faults.outcomes() if o.task_id != outcome.task_id]
        delivered = events(faults, child.task_id, "delivered")
        died = next(e for e in faults.ledger if e.kind in ("restored", "orphaned"))
        story = outcome.story
    assert outcome.lost, story
    assert [e.detail for e in delivered] == ["", "redelivered=True"]
    assert delivered[0].time == died.time == faults.clock.start  # taken before the power loss
    assert (child.deliveries, child.executions, child.state) == (2, 1, "SUCCESS")
    assert seen == [(7, True)]


def test_a_chain_s_next_message_is_taken_before_the_first_is_acked(app: Celery) -> None:
    """acks_late, multiplier 2: the chain publishes its second task when the first
    returns, and the main process takes it while the first is still unacked; a power
    loss then sends both back, the second redelivered."""
    from celery import chain

    app.conf.worker_prefetch_multiplier = 2
    job = make_task(app, acks_late=True)

    @app.task(name="profiles.first", shared=False, acks_late=True)
    def first() -> int:
        effect()
        return 5

    with CeleryFaults(app) as faults:
        faults.track(f"{__name__}.effect")
        faults.run(chain(first.s(), job.s()), "profiles.first:power_loss@2")
        one, two = faults.outcomes()
        taken = [(e.message, e.detail) for e in events(faults, two.task_id, "delivered")]
    assert (one.deliveries, one.state) == (2, "SUCCESS")
    # the first delivery publishes message 2 and loses power; the redelivered one
    # publishes message 3, the same task again (the chain's duplicate)
    assert [detail for message, detail in taken if message == taken[0][0]] == [
        "",
        "redelivered=True",
    ]
    assert seen == [(5, True), (5, False)]


# -- the order requeued messages come back in --------------------------------------


@pytest.mark.parametrize(
    ("profile", "spec", "order"),
    [
        # RabbitMQ puts requeued messages back at their original places in the queue
        ("rabbitmq", "power_loss@1", [0, 1, 2, 3]),
        ("rabbitmq", "warm_shutdown@1", [1, 2, 3]),
        # kombu's Redis sweep restores the newest expired delivery first, each to
        # the end the consumer pops from: the oldest is delivered first again
        ("redis", "power_loss@1", [0, 1, 2, 3]),
        # a closing channel restores its deliveries oldest first, each to that
        # same end: the newest is delivered first again
        ("redis", "warm_shutdown@1", [3, 2, 1]),
    ],
)
def test_requeued_messages_come_back_in_the_order_the_broker_gives(
    app: Celery, profile: str, spec: str, order: list[int]
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 60, **SWEEP_EVERY_SECOND}
    task = make_task(app, acks_late=True)
    with CeleryFaults(app, profile=profile) as faults:
        faults.track(f"{__name__}.effect")
        faults.inject(f"profiles.job:{spec}")
        for n in range(4):
            task.delay(n)
        faults.drain()
    assert seen[0] == (0, False)
    assert [n for n, redelivered in seen if redelivered] == order
