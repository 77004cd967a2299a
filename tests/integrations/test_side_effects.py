"""Side effects from the libraries tasks use: httpx, redis-py, smtplib; failures are attempts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

TASKS = """
import smtplib

import fakeredis
import httpx
import requests
from celery import Celery

app = Celery("calls", set_as_current=False)
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = True
cache = fakeredis.FakeRedis()


@app.task(shared=False)
def notify(order_id):
    httpx.post("https://api.example.com/notify", json={"order": order_id}, timeout=3)
    return httpx.get(f"https://api.example.com/orders/{order_id}", timeout=3).json()


CONNECTION_ERRORS = (httpx.ConnectError, requests.ConnectionError)


@app.task(shared=False, autoretry_for=CONNECTION_ERRORS, max_retries=1)
def notify_retrying(order_id, library):
    if library == "httpx":
        httpx.post("https://api.example.com/notify", timeout=3)
    else:
        requests.post("https://api.example.com/notify", timeout=(3, 3))


@app.task(shared=False)
def count_visit(page):
    cache.incr(f"visits:{page}")
    with cache.pipeline() as pipe:
        pipe.set("last", page).expire("last", 60)
        pipe.execute()
    return int(cache.get(f"visits:{page}"))


@app.task(shared=False)
def mail(to):
    smtplib.SMTP().sendmail("shop@example.com", [to], "Subject: hi\\n\\nhello")
"""

CONFTEST = """
import pytest
import calls


@pytest.fixture
def celery_faults_app():
    return calls.app
"""


@pytest.fixture
def calls(project: Callable[..., pytest.Pytester]) -> pytest.Pytester:
    return project(CONFTEST, calls=TASKS)


def test_httpx_requests_through_respx_are_side_effects(calls: pytest.Pytester) -> None:
    calls.makepyfile(
        """
        import httpx
        import calls
        from pytest_celery_faults.integrations.httpx import httpx_mock

        def test_notify_twice_after_a_crash(celery_faults):
            api = httpx_mock(celery_faults)
            posted = api.post("https://api.example.com/notify").respond(204)
            api.get("https://api.example.com/orders/7").respond(json={"status": "paid"})
            outcome = celery_faults.run(calls.notify.s(7), "sigkill@1")
            assert outcome.result == {"status": "paid"}
            assert posted.call_count == 2
            assert [str(e) for e in celery_faults.effects] == [
                "http POST https://api.example.com/notify",
                "http POST https://api.example.com/notify",
                "http GET https://api.example.com/orders/7",
            ]
        """
    )
    calls.runpytest().assert_outcomes(passed=1)


@pytest.mark.parametrize("library", ["httpx", "requests"])
def test_a_request_that_raises_is_an_attempted_effect(
    calls: pytest.Pytester, library: str
) -> None:
    calls.makepyfile(
        f"""
        import httpx
        import requests
        import calls
        from pytest_celery_faults.integrations.httpx import httpx_mock

        def test_connection_error_then_success(celery_faults):
            if {library!r} == "httpx":
                api = httpx_mock(celery_faults)
                api.post("https://api.example.com/notify").mock(
                    side_effect=[httpx.ConnectError("refused"), httpx.Response(204)]
                )
            else:
                url = "https://api.example.com/notify"
                celery_faults.http.add("POST", url, body=requests.ConnectionError("refused"))
                celery_faults.http.add("POST", url, status=204)
            outcome = celery_faults.run(calls.notify_retrying.s(1, {library!r}))
            assert (outcome.state, outcome.retries) == ("SUCCESS", 1)
            effects = [effect for effect in celery_faults.effects if effect.kind == "http"]
            assert [effect.delivery for effect in effects] == [1, 2]
            assert effects[0].detail["raised"] in (
                "ConnectError: refused", "ConnectionError: refused"
            )
            assert "raised" not in effects[1].detail
        """
    )
    calls.runpytest().assert_outcomes(passed=1)


def test_redis_commands_and_pipelines_are_side_effects(calls: pytest.Pytester) -> None:
    calls.makepyfile(
        """
        import calls
        from pytest_celery_faults.integrations.redis import track_redis

        def test_counter_incremented_twice(celery_faults):
            calls.cache.flushall()
            track_redis(celery_faults)
            outcome = celery_faults.run(calls.count_visit.s("home"), "sigkill@1")
            assert outcome.result == 2  # the counter is not idempotent
            assert [str(e) for e in celery_faults.effects] == [
                "redis INCRBY visits:home",
                "redis INCRBY visits:home",
                "redis pipeline SET EXPIRE",
                "redis GET visits:home",
            ]

        def test_untracked_after_the_harness(celery_faults):
            calls.cache.set("x", 1)
            assert list(celery_faults.effects) == []
        """
    )
    calls.runpytest().assert_outcomes(passed=2)


def test_smtp_sendmail_is_a_side_effect_even_when_it_fails(calls: pytest.Pytester) -> None:
    calls.makepyfile(
        """
        import calls
        from pytest_celery_faults.integrations.smtp import track_smtp

        def test_unconnected_send_is_attempted(celery_faults):
            track_smtp(celery_faults)
            outcome = celery_faults.run(calls.mail.s("client@example.com"))
            assert outcome.state == "FAILURE"
            [effect] = celery_faults.effects
            assert str(effect) == "mail smtp to client@example.com"
            assert effect.detail["raised"] == "SMTPServerDisconnected: please run connect() first"
        """
    )
    calls.runpytest().assert_outcomes(passed=1)


def test_a_tracked_target_never_called_is_reported(calls: pytest.Pytester) -> None:
    calls.makepyfile(
        """
        import calls

        def test_tracks_what_the_task_never_calls(celery_faults):
            celery_faults.track("calls.cache.decr")  # the task never decrements
            celery_faults.track("calls.cache.get")
            celery_faults.run(calls.count_visit.s("home"))
        """
    )
    result = calls.runpytest("--celery-faults-strict")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*celery_faults (--celery-faults-strict):",
            "*track('calls.cache.decr') counted no call: nothing in the test called it, so it "
            "proved nothing (does the code reach the same work another way, e.g. "
            "Session.begin() rather than Session.commit()?)",
        ]
    )
    assert "calls.cache.get" not in result.stdout.str()
