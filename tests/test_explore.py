"""explore(): whole workloads under drawn fault schedules, checked, shrunk, saved, replayed."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, chain
from celery.worker.request import Request

from pytest_celery_faults import CeleryFaults
from pytest_celery_faults.errors import FaultSpecError
from pytest_celery_faults.explore.checker import tally
from pytest_celery_faults.explore.database import FailureDatabase
from pytest_celery_faults.explore.schedule import MessageRef, Pause, parse_schedule

#: The search draws through Hypothesis (the ``explore`` extra); replays and parsing do not.
searching = pytest.mark.skipif(
    importlib.util.find_spec("hypothesis") is None,
    reason="explore() searches with Hypothesis: pip install 'pytest-celery-faults[explore]'",
)

THIS = sys.modules[__name__]
#: The world the tasks below change: a shared set, reservations and parcels.
WORLD: dict[str, Any] = {}


def read_keys() -> set[str]:
    return set(WORLD["keys"])


def write_keys(keys: set[str]) -> None:
    WORLD["keys"] = keys


def add_key(key: str) -> None:
    WORLD["keys"].add(key)


def reserve_stock(order: str) -> None:
    WORLD["reserved"][order] = WORLD["reserved"].get(order, 0) + 1


def send_parcel(order: str) -> None:
    WORLD["shipped"][order] = WORLD["shipped"].get(order, 0) + 1


def bump() -> None:
    WORLD["count"] += 1


def mark_processed(order: str) -> None:
    WORLD["processed"].add(order)


def fresh_world() -> None:
    WORLD.clear()
    WORLD.update(keys=set(), reserved={}, shipped={}, done=set(), count=0, processed=set())


def keys() -> list[str]:
    return sorted(WORLD["keys"])


@pytest.fixture
def tasks(app: Celery) -> dict[str, Any]:
    """Tasks on a worker of concurrency 2 that acks late and requeues a lost child's message."""
    app.conf.worker_concurrency = 2
    app.conf.task_acks_late = True
    app.conf.task_reject_on_worker_lost = True

    @app.task(name="add_rmw", shared=False)
    def add_rmw(key: str) -> None:
        THIS.write_keys(THIS.read_keys() | {key})  # read-modify-write: races lose updates

    @app.task(name="add_atomic", shared=False)
    def add_atomic(key: str) -> None:
        THIS.add_key(key)

    @app.task(name="reserve", shared=False)
    def reserve(order: str) -> str:
        if order in WORLD["done"]:
            return order  # a redelivered parent skips: its idempotency key
        THIS.reserve_stock(order)
        WORLD["done"].add(order)
        return order

    @app.task(name="ship", shared=False)
    def ship(order: str) -> None:
        # Ships what was reserved and not shipped yet: right unless the count is wrong.
        if WORLD["shipped"].get(order, 0) < WORLD["reserved"].get(order, 0):
            THIS.send_parcel(order)

    @app.task(name="incr", shared=False)
    def incr() -> None:
        THIS.bump()

    @app.task(name="process", shared=False)
    def process(order: str) -> None:
        THIS.mark_processed(order)  # idempotent: a set

    @app.task(name="relay", shared=False)
    def relay() -> None:
        incr.delay()  # a child publish, from the task's body

    return {
        "relay": relay,
        "add_rmw": add_rmw,
        "add_atomic": add_atomic,
        "reserve": reserve,
        "ship": ship,
        "incr": incr,
        "process": process,
    }


@pytest.fixture
def faults(app: Celery, tasks: dict[str, Any]) -> Iterator[CeleryFaults]:
    fresh_world()
    with CeleryFaults(app, seed=0) as harness:
        tracked = ("read_keys", "write_keys", "add_key", "reserve_stock", "send_parcel", "bump")
        for name in (*tracked, "mark_processed"):
            harness.track((THIS, name))
        yield harness


def three_adds(tasks: dict[str, Any], name: str) -> list[Any]:
    return [tasks[name].s(key) for key in ("a", "b", "c")]


# -- the done-when of issue 22 ----------------------------------------------------


@searching
def test_a_lost_update_is_found_shrunk_to_two_messages_and_one_interleaving(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    report = faults.explore(three_adds(tasks, "add_rmw"), keys, fresh_world, budget=50, seed=0)
    assert not report.ok
    assert report.found_at is not None and report.found_at <= 50
    schedule = parse_schedule(report.replay or "")
    assert schedule.messages is not None and len(schedule.messages) == 2
    assert schedule.interleave and not schedule.faults and not schedule.pauses
    assert report.failure is not None
    assert "observe() differs from the fault-free run" in (report.failure.problem or "")
    with pytest.raises(AssertionError) as failed:
        report.assert_ok()
    text = str(failed.value)
    assert f"replay: {report.replay}" in text
    assert "timeline of the smallest failing schedule:" in text
    assert "side effect 2: call test_explore.write_keys" in text
    # The replay string runs that one schedule again, and it fails the same way.
    again = faults.explore(three_adds(tasks, "add_rmw"), keys, fresh_world, replay=report.replay)
    assert not again.ok and again.runs == 1
    assert again.failure is not None and again.failure.problem == report.failure.problem
    assert str(again.failure.schedule) == report.replay


@searching
def test_the_atomic_add_passes_the_same_budget(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    report = faults.explore(three_adds(tasks, "add_atomic"), keys, fresh_world, budget=50, seed=0)
    report.assert_ok()
    assert report.runs == 50
    counts = report.counts["add_atomic"]
    assert counts.published >= 50  # most runs publish two or three messages
    assert counts.fates["lost"] == 0
    assert counts.fates["recovered"] + counts.fates["duplicated"] > 0  # faults did fire


@searching
def test_a_kill_on_the_parent_and_a_redelivery_of_the_child_are_found_and_shrunk(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    def workload() -> None:
        chain(tasks["reserve"].s("o1"), tasks["ship"].s()).delay()

    def shipped() -> dict[str, int]:
        return dict(WORLD["shipped"])

    kinds = ["sigkill", "redeliver"]
    for fault in ("reserve:sigkill@1", "ship:redeliver"):  # each alone is harmless
        alone = faults.explore(workload, shipped, fresh_world, kinds=kinds, replay=fault)
        alone.assert_ok()
    report = faults.explore(workload, shipped, fresh_world, kinds=kinds, budget=100, seed=3)
    # The child dies after shipping, or is delivered again: either way it runs again.
    assert report.replay in (
        "reserve#1:sigkill@1 | ship#1:redeliver",
        "reserve#1:sigkill@1 | ship#1:sigkill@1",
    )
    assert report.failure is not None
    assert report.failure.problem == (
        "observe() differs from the fault-free run: {'o1': 1} became {'o1': 2}"
    )
    again = faults.explore(workload, shipped, fresh_world, replay=report.replay)
    assert not again.ok


@searching
def test_the_same_seed_gives_the_same_report_byte_for_byte(
    app: Celery, tasks: dict[str, Any]
) -> None:
    texts = []
    for _ in range(2):
        fresh_world()
        with CeleryFaults(app, seed=7) as harness:
            harness.track((THIS, "read_keys"))
            harness.track((THIS, "write_keys"))
            report = harness.explore(three_adds(tasks, "add_rmw"), keys, fresh_world, budget=30)
            texts.append(str(report))
    assert texts[0] == texts[1]
    assert "explore (seed 7, budget 30)" in texts[0]


@searching
def test_a_failing_schedule_is_saved_and_replayed_first_next_time(
    faults: CeleryFaults, tasks: dict[str, Any], tmp_path: Path
) -> None:
    workload = three_adds(tasks, "add_rmw")
    found = faults.explore(workload, keys, fresh_world, budget=50, database=tmp_path, key="t")
    assert found.replay is not None
    assert FailureDatabase(tmp_path).load("t") == [found.replay]
    # Next time: the saved schedule fails again before any search (budget or seed aside).
    again = faults.explore(
        workload, keys, fresh_world, budget=1, seed=99, database=tmp_path, key="t"
    )
    assert again.replayed == [found.replay]
    assert again.replay == found.replay and again.found_at is None
    assert "a saved schedule from the failure database fails again" in str(again)
    # Fixed (the atomic task): the saved schedule passes and is forgotten.
    fixed = three_adds(tasks, "add_atomic")
    passed = faults.explore(fixed, keys, fresh_world, budget=5, database=tmp_path, key="t")
    assert passed.ok and passed.replayed == [found.replay]
    assert FailureDatabase(tmp_path).load("t") == []


@searching
def test_a_one_message_schedule_is_a_spec_run_accepts(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    report = faults.explore(
        lambda: tasks["incr"].delay(), lambda: WORLD["count"], fresh_world, budget=50
    )
    replay = report.replay
    assert replay is not None and "#" not in replay and replay.startswith("incr:")
    fresh_world()
    faults.reset()
    outcome = faults.run(tasks["incr"].s(), replay)
    assert WORLD["count"] == 2, outcome.story


@searching
def test_an_invariant_is_checked_on_every_run(faults: CeleryFaults, tasks: dict[str, Any]) -> None:
    def at_most_once(count: int) -> bool:
        return count <= 1

    report = faults.explore(
        [tasks["incr"].s()],
        lambda: WORLD["count"],
        fresh_world,
        invariant=at_most_once,
        kinds=["redeliver"],
        budget=20,
    )
    assert report.failure is not None
    assert report.failure.problem == "invariant returned False for 2"
    assert report.replay == "incr:redeliver"


@searching
def test_a_fault_free_run_that_breaks_the_invariant_is_refused(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    def never(count: int) -> None:
        raise AssertionError(f"count is {count}")

    with pytest.raises(AssertionError, match="the fault-free run of the workload already fails"):
        faults.explore([tasks["incr"].s()], lambda: WORLD["count"], fresh_world, invariant=never)


# -- the checker ------------------------------------------------------------------


def test_the_checker_counts_each_message_fate(app: Celery, tasks: dict[str, Any]) -> None:
    app.conf.task_acks_late = False  # the default early ack: a killed child's message is lost
    app.conf.worker_concurrency = 1
    fresh_world()
    with CeleryFaults(app, seed=0) as harness:
        harness.track((THIS, "bump"))
        harness.inject("incr:sigkill@1")
        tasks["incr"].delay()
        tasks["incr"].delay()
        harness.drain()
        counts = tally(harness.outcomes(), harness.effects.effects)
        assert counts["incr"].published == 2
        assert counts["incr"].fates["lost"] == 1
        assert counts["incr"].fates["once"] == 1
        assert counts["incr"].line() == (
            "published 2, once 1 (50%), recovered 0, duplicated 0, lost 1 (50%), failed 0"
        )


@pytest.mark.skipif(
    "success_meta" not in Request.on_failure.__code__.co_varnames,
    reason="Celery 5.7+ acks a lost child's message whose result is SUCCESS already; "
    "earlier releases requeue it, so the redelivery is not the last",
)
def test_a_message_that_succeeded_before_its_redelivery_was_cut_short_is_not_lost(
    app: Celery, tasks: dict[str, Any]
) -> None:
    fresh_world()
    with CeleryFaults(app, seed=0) as harness:
        harness.track((THIS, "bump"))
        # RabbitMQ requeues what the dropped connection held unacked; the first
        # execution still succeeds, the redelivery is killed before doing anything.
        outcome = harness.run(tasks["incr"].s(), "broker_restart@1;sigkill@0")
        assert outcome.state == "SUCCESS" and WORLD["count"] == 1, outcome.story
        counts = tally(harness.outcomes(), harness.effects.effects)
        assert counts["incr"].fates["lost"] == 0
        assert counts["incr"].fates["recovered"] == 1


@searching
def test_a_rollout_drawn_keeps_its_grace_in_the_replay(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    def fired() -> list[str]:  # differs from the fault-free run as soon as a fault fires
        return [fault for outcome in faults.outcomes() for fault in outcome.faults]

    report = faults.explore(
        [tasks["incr"].s()], fired, fresh_world, kinds=["rollout(7)"], budget=20
    )
    assert report.replay == "incr:rollout(7)@0", report
    assert str(parse_schedule(report.replay)) == report.replay  # it reads back


# -- schedules and their replay strings --------------------------------------------


def test_a_replay_string_reads_back_to_the_same_schedule() -> None:
    text = (
        "messages(1,3) | add#2:sigkill@1;ok | ship#1:redeliver | interleave(1212) "
        "| pause(add#1.1@2+60)"
    )
    schedule = parse_schedule(text)
    assert str(schedule) == text
    assert schedule.messages == (1, 3)
    assert schedule.pauses == (Pause(MessageRef("add", 1), 1, 2, 60),)
    assert str(schedule.fault_for(MessageRef("ship", 1), 2)) == "redeliver"
    assert str(parse_schedule("add:exit(3)@1")) == "add:exit(3)@1"
    assert str(parse_schedule("ok")) == "ok"
    first = parse_schedule("sigkill@0")
    assert str(first.fault_for(MessageRef("anything", 4), 1)) == "sigkill@0"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("add#1:bogus@1", "unknown fault 'bogus'"),
        ("interleave(1-2)", "'interleave(1-2)' names executions"),
        ("messages(0)", "'messages(0)' lists signatures"),
        ("add#1:sigkill@1 || ok", "an empty item"),
        ("add#1:x:sigkill@1", "names the message twice"),
    ],
)
def test_a_bad_replay_string_names_the_bad_item(text: str, named: str) -> None:
    with pytest.raises(FaultSpecError, match=named.replace("(", r"\(").replace(")", r"\)")):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"budget": 0}, "explore(budget=0): expected a whole number >= 1"),
        ({"seed": "x"}, "explore(seed='x'): expected a whole number"),
        ({"kinds": "sigkill"}, "kinds='sigkill': expected a list of fault kinds"),
        ({"kinds": ["sigkil"]}, "kinds: 'sigkil'"),
    ],
)
def test_bad_arguments_are_refused_in_one_line(
    faults: CeleryFaults, tasks: dict[str, Any], options: dict[str, Any], error: str
) -> None:
    with pytest.raises((ValueError, TypeError)) as refused:
        faults.explore([tasks["incr"].s()], lambda: WORLD["count"], **options)
    assert error in str(refused.value)
    assert "\n" not in str(refused.value)


# -- the plugin -------------------------------------------------------------------


@searching
def test_the_budget_and_the_database_come_from_the_command_line_and_the_ini(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini(
        """
        [pytest]
        celery_faults_explore_db = saved-schedules
        """
    )
    pytester.makepyfile(
        textwrap.dedent(
            """
            from celery import Celery

            app = Celery("explored", set_as_current=False)
            COUNT = [0]

            def bump():
                COUNT[0] += 1

            @app.task(name="incr", acks_late=True, shared=False)
            def incr():
                bump()

            def reset():
                COUNT[0] = 0

            def test_incr(celery_faults):
                celery_faults.track((__import__(__name__), "bump"))
                report = celery_faults.explore(
                    [incr.s()], lambda: COUNT[0], reset, kinds=["redeliver"]
                )
                print(report.summary())
                report.assert_ok()

            import pytest

            @pytest.fixture
            def celery_faults_app():
                return app
            """
        )
    )
    result = pytester.runpytest("-p", "no:randomly", "--celery-faults-explore=7", "-s")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*explore (seed 0, budget 7)*", "*replay: *incr:redeliver*"])
    saved = list((pytester.path / "saved-schedules" / "explore").iterdir())
    assert len(saved) == 1 and "incr:redeliver" in saved[0].read_text()
    again = pytester.runpytest("-p", "no:randomly", "-s")
    again.assert_outcomes(failed=1)
    again.stdout.fnmatch_lines(["*replayed first from the failure database: 1*"])


def test_a_bad_budget_on_the_command_line_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_nothing(): pass")
    result = pytester.runpytest("--celery-faults-explore=none")
    result.stderr.fnmatch_lines(["*--celery-faults-explore='none': expected a whole number*"])
    assert result.ret == pytest.ExitCode.USAGE_ERROR


@searching
def test_a_stall_past_redis_visibility_timeout_runs_a_message_twice(
    app: Celery, tasks: dict[str, Any]
) -> None:
    app.conf.broker_transport_options = {"visibility_timeout": 60}
    fresh_world()
    with CeleryFaults(app, profile="redis", seed=0) as harness:
        harness.track((THIS, "bump"))
        report = harness.explore(
            [tasks["incr"].s()], lambda: WORLD["count"], fresh_world, kinds=["pause"], budget=30
        )
    assert report.replay is not None and report.replay.startswith("pause(incr#1.1@1+")
    seconds = int(report.replay.rsplit("+", 1)[1].rstrip(")"))
    assert seconds > 60  # a stall past the visibility timeout: Redis delivers it again
    assert report.failure is not None and "0 became" not in (report.failure.problem or "")
    assert "redelivered=True" in report.failure.timeline


@searching
def test_raised_exceptions_join_the_mix_when_asked_for(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    report = faults.explore(
        [tasks["incr"].s()],
        lambda: WORLD["count"],
        fresh_world,
        kinds=["raise(ConnectionError)"],
        budget=20,
    )
    assert report.replay == "incr:raise(ConnectionError)@0"
    assert report.counts["incr"].fates["failed"] >= 1


SHARDED = """
import sys

import pytest
from celery import Celery

app = Celery("sharded", set_as_current=False)
app.conf.worker_concurrency = 2
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = True
KEYS = set()


def read():
    return set(KEYS)


def write(keys):
    KEYS.clear()
    KEYS.update(keys)


@app.task(name="add", shared=False)
def add(key):
    write(read() | {key})


@pytest.fixture
def celery_faults_app():
    return app


@pytest.mark.explore_shards(2)
def test_adds(celery_faults):
    celery_faults.track((sys.modules[__name__], "read"))
    celery_faults.track((sys.modules[__name__], "write"))
    report = celery_faults.explore(
        [add.s(key) for key in "abc"], lambda: sorted(KEYS), KEYS.clear, budget=60
    )
    report.assert_ok()
"""


@searching
def test_shards_spread_over_xdist_find_what_one_process_finds(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_sharded=SHARDED)
    findings = []
    for spread in (["-n", "0"], ["-n", "2"]):
        shutil.rmtree(pytester.path / ".celery-faults", ignore_errors=True)
        result = pytester.runpytest("-p", "no:randomly", *spread)
        result.assert_outcomes(failed=2)
        lines = result.stdout.lines
        findings.append(  # from the failures' own lines (CI=true repeats them in the summary)
            sorted(
                line.strip()
                for line in lines
                if line.startswith("E ") and ("replay:" in line or "FAILED (" in line)
            )
        )
    assert findings[0] == findings[1]
    assert any("explore (seed 1, budget 30)" in line for line in result.stdout.lines)
    assert len(findings[0]) == 4  # each shard: what failed, and its replay


def test_a_bad_shard_count_is_refused_naming_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.explore_shards(0)
        def test_x():
            pass
        """
    )
    result = pytester.runpytest("-p", "no:randomly")
    result.stdout.fnmatch_lines(["*explore_shards(0): expected one whole number of shards*"])
    assert result.ret == pytest.ExitCode.INTERRUPTED


# -- publisher faults ---------------------------------------------------------------

ORDERS = ("o1", "o2", "o3")


def publish_orders(tasks: dict[str, Any]) -> None:
    for order in ORDERS:
        tasks["process"].delay(order)  # the app's own .delay(), no confirms


def every_order_processed(processed: set[str]) -> None:
    missing = sorted(set(ORDERS) - processed)
    assert not missing, f"orders never processed: {missing}"


@searching
def test_a_lost_publish_is_found_shrunk_and_replayable(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    def workload() -> None:
        publish_orders(tasks)

    def processed() -> set[str]:
        return set(WORLD["processed"])

    # The worker's faults alone never lose an order (acks_late, reject_on_worker_lost).
    kinds = ["sigkill", "redeliver"]
    clean = faults.explore(
        workload, processed, fresh_world, every_order_processed, kinds=kinds, budget=30
    )
    clean.assert_ok()
    # A publish that returns but is never queued loses one.
    report = faults.explore(
        workload,
        processed,
        fresh_world,
        every_order_processed,
        kinds=[*kinds, "publish_lost"],
        budget=50,
        seed=0,
    )
    schedule = parse_schedule(report.replay or "")  # shrunk: one lost publish, nothing else
    assert not schedule.interleave and not schedule.pauses and schedule.first is None
    [(ref, spec)] = schedule.faults
    assert ref.task == "process" and str(spec) == "publish_lost"
    assert report.failure is not None
    lost = ORDERS[ref.k - 1]
    problem = report.failure.problem or ""
    assert problem.startswith(f"invariant failed: orders never processed: [{lost!r}]")
    assert "publish_lost" in report.failure.timeline
    assert report.counts["process"].fates["lost"] >= 1
    again = faults.explore(
        workload, processed, fresh_world, every_order_processed, replay=report.replay
    )
    assert not again.ok and again.failure is not None
    assert again.failure.problem == report.failure.problem


@searching
def test_a_refused_publish_the_workload_does_not_catch_fails_the_run(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    report = faults.explore(
        lambda: publish_orders(tasks),
        lambda: set(WORLD["processed"]),
        fresh_world,
        kinds=["publish_refused"],
        budget=20,
    )
    schedule = parse_schedule(report.replay or "")
    [(ref, spec)] = schedule.faults
    assert ref.task == "process" and str(spec) == "publish_refused"
    assert report.failure is not None
    problem = report.failure.problem or ""
    assert problem.startswith("the workload raised OperationalError: ")
    assert str(ref) in problem  # the message's name in the replay, not its task id


@searching
def test_a_child_publish_queued_twice_is_found_and_replayable(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    def workload() -> None:
        tasks["relay"].delay()

    def count() -> int:
        return int(WORLD["count"])

    report = faults.explore(workload, count, fresh_world, kinds=["publish_twice"], budget=20)
    assert report.replay == "incr:publish_twice"  # the child's publish, not the relay's
    assert report.failure is not None
    assert report.failure.problem == "observe() differs from the fault-free run: 1 became 2"
    again = faults.explore(workload, count, fresh_world, replay=report.replay)
    assert again.failure is not None and again.failure.problem == report.failure.problem


def test_a_publish_fault_with_its_own_publish_number_is_not_a_kind(
    faults: CeleryFaults, tasks: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match="name it without @P"):
        faults.explore([tasks["incr"].s()], lambda: WORLD["count"], kinds=["publish_lost@2"])


# -- the JSON report -----------------------------------------------------------------

REPORTED = """
import sys

import pytest
from celery import Celery

app = Celery("reported", set_as_current=False)
app.conf.task_acks_late = True
COUNT = [0]
DONE = [0]


def bump():
    COUNT[0] += 1


def mark():
    DONE[0] = 1


@app.task(name="incr", shared=False)
def incr():
    bump()


@app.task(name="mark", shared=False)
def mark_done():
    mark()


def reset():
    COUNT[0] = DONE[0] = 0


@pytest.fixture
def celery_faults_app():
    return app


def test_explored(celery_faults):
    this = sys.modules[__name__]
    celery_faults.track((this, "bump"))
    celery_faults.track((this, "mark"))
    found = celery_faults.explore(
        [incr.s()], lambda: COUNT[0], reset, kinds=["redeliver"], budget=7
    )
    clean = celery_faults.explore(
        [mark_done.s()], lambda: DONE[0], reset, kinds=["redeliver"], budget=5
    )
    assert clean.ok and not found.ok
"""


@searching
def test_the_json_report_has_each_explore_deterministically(pytester: pytest.Pytester) -> None:
    import json

    pytester.makepyfile(test_reported=REPORTED)
    texts = []
    for _ in range(2):
        shutil.rmtree(pytester.path / ".celery-faults", ignore_errors=True)
        result = pytester.runpytest("-p", "no:randomly", "--celery-faults-report=report.json")
        result.assert_outcomes(passed=1)
        texts.append((pytester.path / "report.json").read_bytes())
    assert texts[0] == texts[1]  # the same seed, the same bytes
    test = json.loads(texts[0])["tests"]["test_reported.py::test_explored"]
    found, clean = test["explore"]
    assert found["seed"] == 0 and found["budget"] == 7
    assert found["failed"] and found["replay"] == "incr:redeliver"
    assert found["problem"] == "observe() differs from the fault-free run: 1 became 2"
    assert found["runs"] >= 1 and found["found_at"] == found["runs"]
    assert found["counts"]["incr"]["duplicated"] >= 1
    assert clean == {
        "seed": 0,
        "budget": 5,
        "runs": 5,
        "found_at": None,
        "shrink_runs": 0,
        "replayed": [],
        "replay": None,
        "failed": False,
        "problem": None,
        "counts": {
            "mark": {
                "published": clean["counts"]["mark"]["published"],
                "once": clean["counts"]["mark"]["once"],
                "recovered": clean["counts"]["mark"]["recovered"],
                "duplicated": clean["counts"]["mark"]["duplicated"],
                "lost": 0,
                "failed": 0,
            }
        },
    }
    assert clean["counts"]["mark"]["published"] == 5
