"""The eager gate: a suite that runs its tasks eagerly is checked under --celery-faults."""

from __future__ import annotations

import json

import pytest

APP = """
from celery import Celery

app = Celery("eshop", set_as_current=False)
app.conf.task_always_eager = True
app.conf.task_eager_propagates = True
stock = {"widget": 10}
status = {}
attempts = []


@app.task(name="eshop.take_one", acks_late=True, shared=False)
def take_one(sku):
    stock[sku] -= 1
    return stock[sku]


@app.task(name="eshop.mark_paid", acks_late=True, ignore_result=True, shared=False)
def mark_paid(order):
    status[order] = "paid"


@app.task(name="eshop.add", shared=False)
def add(a, b):
    return a + b


@app.task(name="eshop.patient", bind=True, max_retries=3, shared=False)
def patient(self):
    attempts.append(self.request.retries)
    if self.request.retries < 3:
        raise self.retry(countdown=5)
    return "done"
"""

SUITE = """
import pytest
import eshop


@pytest.fixture(autouse=True)
def fresh():
    eshop.stock["widget"] = 10
    eshop.status.clear()
    eshop.attempts.clear()


def test_take_one_with_delay():
    eshop.take_one.delay("widget")
    assert eshop.stock["widget"] == 9


def test_take_one_with_apply():
    assert eshop.take_one.apply(("widget",)).get() == 9


def test_mark_paid():
    eshop.mark_paid.delay(7)
    assert eshop.status == {7: "paid"}


def test_add_returns_its_result():
    assert eshop.add.delay(2, 3).get() == 5
    assert eshop.add.apply_async((4, 5)).get() == 9


def test_not_a_task():
    assert True
"""


@pytest.fixture
def eshop(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(eshop=APP, test_suite=SUITE)
    return pytester


def test_without_the_gate_nothing_changes(eshop: pytest.Pytester) -> None:
    result = eshop.runpytest("-p", "no:randomly")
    result.assert_outcomes(passed=5)
    assert "= celery-faults =" not in result.stdout.str()


def test_the_gate_catches_the_eager_non_idempotent_task(eshop: pytest.Pytester) -> None:
    result = eshop.runpytest(
        "-p", "no:randomly", "--celery-faults=redeliver*1", "--celery-faults-report=r.json"
    )
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(
        [
            "*def test_take_one_with_delay():*",
            "E       assert 8 == 9",
            "*- celery-faults: what the eager gate ran -*",
            "eshop.take_one*: returned, state=SUCCESS (9), acked, deliveries=2, "
            "executions=2, retries=0",
            "*FAULT redeliver: the broker delivers it again",
            "*def test_take_one_with_apply():*",
            "E       AssertionError: assert 8 == 9",
            "*= celery-faults =*",
            "0 test(s) used the harness, 4 ran tasks eagerly through the gate: 3 task(s) "
            "exercised, 5 message(s), 5 fault(s) injected, 0 scenario(s) classed (seed 0)",
            "the gate (--celery-faults='redeliver*1') ran 5 eager call(s) of 3 task(s) in "
            "4 test(s)",
            "FAILED test_suite.py::test_take_one_with_delay (replay: pytest "
            "'test_suite.py::test_take_one_with_delay' --celery-faults='redeliver*1')",
            "FAILED test_suite.py::test_take_one_with_apply (replay: pytest "
            "'test_suite.py::test_take_one_with_apply' --celery-faults='redeliver*1')",
        ]
    )
    document = json.loads((eshop.path / "r.json").read_text())
    add = document["tests"]["test_suite.py::test_add_returns_its_result"]
    assert (add["gated"], add["tasks"], add["messages"], add["verdict"]) == (
        2,
        ["eshop.add"],
        2,
        "passed",
    )
    assert "test_suite.py::test_not_a_task" not in document["tests"]
    failed = document["tests"]["test_suite.py::test_take_one_with_delay"]
    assert [(o["name"], o["deliveries"], o["faults"]) for o in failed["outcomes"]] == [
        ("eshop.take_one", 2, ["redeliver"])
    ]


def test_the_gate_runs_an_app_configured_the_django_way(eshop: pytest.Pytester) -> None:
    """(#19.1) CELERY_-prefixed settings (Celery's Django guide) do not keep the gate eager."""
    django_style = APP.replace(
        "app.conf.task_always_eager = True\napp.conf.task_eager_propagates = True\n",
        """
class Settings:
    CELERY_TASK_ALWAYS_EAGER = True
    CELERY_TASK_EAGER_PROPAGATES = True
    CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # never reached: nothing listens on port 1
    CELERY_RESULT_BACKEND = "redis://127.0.0.1:1/1"


app.config_from_object(Settings, namespace="CELERY")
""",
    )
    assert django_style != APP
    eshop.makepyfile(eshop=django_style)
    result = eshop.runpytest("-p", "no:randomly", "--celery-faults=redeliver*1")
    result.assert_outcomes(passed=3, failed=2)
    result.stdout.fnmatch_lines(["*the gate (--celery-faults='redeliver*1') ran 5 eager call(s)*"])


def test_a_gated_test_with_specs_of_its_own_runs_under_those(eshop: pytest.Pytester) -> None:
    eshop.makepyfile(
        test_own="""
        import pytest
        import eshop

        @pytest.mark.celery_faults("ack_lost")
        def test_take_one_under_a_lost_ack():
            eshop.take_one.delay("widget")
            print("stock", eshop.stock["widget"])
        """
    )
    alone = eshop.runpytest(
        "-p", "no:randomly", "-s", "test_own.py", "--celery-faults=redeliver*2"
    )
    alone.stdout.fnmatch_lines(["*stock 8"])
    stacked = eshop.runpytest(
        "-p",
        "no:randomly",
        "-s",
        "test_own.py",
        "--celery-faults=redeliver*2",
        "--celery-faults-stack",
    )
    stacked.stdout.fnmatch_lines(["*stock 6"])


def test_gated_calls_publish_with_real_serialization(eshop: pytest.Pytester) -> None:
    eshop.makepyfile(
        test_serial="""
        import eshop

        def test_an_object_argument():
            eshop.add.apply((object(), 1))
        """
    )
    plain = eshop.runpytest("-p", "no:randomly", "test_serial.py")
    plain.assert_outcomes(failed=1)
    plain.stdout.fnmatch_lines(["E   *TypeError: unsupported operand*"])
    gated = eshop.runpytest("-p", "no:randomly", "test_serial.py", "--celery-faults=redeliver")
    gated.assert_outcomes(failed=1)
    gated.stdout.fnmatch_lines(
        ["E   *EncodeError*Object of type object is not JSON serializable*"]
    )


def test_a_retried_task_redelivers_its_final_message_only(eshop: pytest.Pytester) -> None:
    eshop.makepyfile(
        test_retry="""
        import eshop

        def test_patient():
            eshop.app.conf.task_eager_propagates = False  # Celery's eager retry raises Retry
            assert eshop.patient.delay().get() == "done"
            print("attempts", eshop.attempts)
        """
    )
    plain = eshop.runpytest("-p", "no:randomly", "-s", "test_retry.py")
    plain.stdout.fnmatch_lines(["*attempts [[]0, 1, 2, 3[]]"])
    gated = eshop.runpytest(
        "-p", "no:randomly", "-s", "test_retry.py", "--celery-faults=redeliver"
    )
    gated.assert_outcomes(passed=1)
    gated.stdout.fnmatch_lines(["*attempts [[]0, 1, 2, 3, 3[]]"])


def test_the_exempt_marker_opts_a_test_out_with_its_reason(eshop: pytest.Pytester) -> None:
    eshop.makepyfile(
        test_exempt="""
        import pytest
        import eshop

        @pytest.mark.celery_faults_exempt(reason="stock is reconciled nightly")
        def test_take_one_exempt():
            eshop.take_one.delay("widget")
            assert eshop.stock["widget"] == 9
        """
    )
    report = eshop.path / "report.json"
    result = eshop.runpytest(
        "-p",
        "no:randomly",
        "test_exempt.py",
        "--celery-faults=redeliver",
        f"--celery-faults-report={report}",
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "warning: the gate (--celery-faults='redeliver') exercised nothing: no test used "
            "the celery_faults harness or ran a task eagerly",
            "exempt from --celery-faults: test_exempt.py::test_take_one_exempt "
            "(stock is reconciled nightly)",
        ]
    )
    document = json.loads(report.read_text())
    assert document["exempt"] == {
        "test_exempt.py::test_take_one_exempt": "stock is reconciled nightly"
    }
    assert document["totals"]["tests"] == 0


def test_the_exempt_marker_needs_a_reason(eshop: pytest.Pytester) -> None:
    eshop.makepyfile(
        test_exempt="""
        import pytest

        @pytest.mark.celery_faults_exempt
        def test_x():
            pass
        """
    )
    result = eshop.runpytest("test_exempt.py")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*test_exempt.py::test_x: bad celery-faults marker: celery_faults_exempt needs a reason*"]
    )


def test_a_test_with_specs_of_its_own_is_not_stacked_unless_asked(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(eshop=APP)
    pytester.makeini("[pytest]\ncelery_faults_app = eshop:app\n")
    pytester.makepyfile(
        test_own="""
        import pytest
        import eshop

        def test_run_with_its_own_spec(celery_faults):
            outcome = celery_faults.run(eshop.add.s(1, 2), "ack_lost")
            assert outcome.deliveries == 2, outcome.story

        @pytest.mark.redeliver(times=1)
        def test_marker(celery_faults):
            eshop.add.delay(1, 2)
            assert [o.deliveries for o in celery_faults.drain()] == [2]
        """
    )
    alone = pytester.runpytest("-p", "no:randomly", "--celery-faults=redeliver*2")
    alone.assert_outcomes(passed=2)
    stacked = pytester.runpytest(
        "-p", "no:randomly", "--celery-faults=redeliver*2", "--celery-faults-stack"
    )
    stacked.assert_outcomes(failed=2)
    stacked.stdout.fnmatch_lines(["E   *deliveries=4*", "E   *assert [[]3[]] == [[]2[]]"])


CONTRIB = """
import pytest
import eshop


@pytest.fixture
def celery_app():
    eshop.app.conf.update(
        task_always_eager=False, broker_url="memory://", result_backend="cache+memory://"
    )
    return eshop.app


@pytest.fixture
def celery_worker_parameters():
    return {"perform_ping_check": False}


def test_take_one_on_the_worker(celery_app, celery_worker):
    eshop.stock["widget"] = 10
    assert eshop.take_one.delay("widget").get(timeout=10) == 9
    assert eshop.stock["widget"] == 9
"""


def test_celery_contrib_pytest_worker_suites_go_through_the_gate(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(eshop=APP, test_contrib=CONTRIB)
    plain = pytester.runpytest_subprocess("-p", "celery.contrib.pytest", "-p", "no:randomly")
    plain.assert_outcomes(passed=1)
    gated = pytester.runpytest_subprocess(
        "-p", "celery.contrib.pytest", "-p", "no:randomly", "--celery-faults=redeliver"
    )
    gated.assert_outcomes(failed=1)
    gated.stdout.fnmatch_lines(
        ["E       AssertionError: assert 8 == 9", "*ran 1 eager call(s) of 1 task(s)*"]
    )


def test_a_gated_task_sees_none_of_the_test_s_context(pytester: pytest.Pytester) -> None:
    # A task that passes only because it runs on the test's thread (a context
    # variable, a thread-local the test set: a Flask app context, a scoped session)
    # fails under the gate as it would on a worker, whatever the spec: the app's
    # own per-task setup (the base class below) is what gives a task its context.
    pytester.makepyfile(
        ctxshop="""
        import contextvars, threading
        from celery import Celery, Task

        tenant = contextvars.ContextVar("tenant", default=None)
        local = threading.local()

        class TenantTask(Task):
            def __call__(self, *args, **kwargs):
                token = tenant.set("from the task's own setup")
                try:
                    return super().__call__(*args, **kwargs)
                finally:
                    tenant.reset(token)

        app = Celery("ctxshop", set_as_current=False)
        app.conf.task_always_eager = True

        @app.task(name="ctxshop.read", shared=False)
        def read():
            return [tenant.get(), getattr(local, "user", None)]

        @app.task(name="ctxshop.read_own", base=TenantTask, shared=False)
        def read_own():
            return tenant.get()
        """,
        test_ctx="""
        import ctxshop

        def test_relies_on_the_test_s_context():
            ctxshop.tenant.set("from the test")
            ctxshop.local.user = "ada"
            assert ctxshop.read.delay().get() == ["from the test", "ada"]

        def test_gets_its_context_from_the_app():
            ctxshop.tenant.set("from the test")
            assert ctxshop.read_own.delay().get() == "from the task's own setup"
            assert ctxshop.tenant.get() == "from the test"
        """,
    )
    for spec in ("redeliver*1", "ack_lost"):
        result = pytester.runpytest("-p", "no:randomly", f"--celery-faults={spec}")
        result.assert_outcomes(passed=1, failed=1)
        result.stdout.fnmatch_lines(
            ["E       AssertionError: assert [None, None] == ['from the test', 'ada']"]
        )
