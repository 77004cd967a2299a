"""Real-broker conformance: brokers on loopback, mandatory in CI, a skip elsewhere."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from pytest_celery_faults.real.runner import BrokerUnreachable, RealBrokerRunner, check_reachable

BROKERS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": "redis://127.0.0.1:6379/13",
}
BACKEND = "redis://127.0.0.1:6379/14"
#: Redis redelivers an unacked message this long after delivery: short, but longer than a
#: task here runs (2 s limits) plus the seconds billiard takes to report a killed child.
VISIBILITY_TIMEOUT = 8.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_broker: runs a real prefork worker on RabbitMQ or Redis (loopback)"
    )


def brokers_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("CELERY_FAULTS_REQUIRE_BROKERS") == "1"


def real_runner(broker: str, **options: object) -> RealBrokerRunner:
    """A runner on ``broker`` for the realapp; the test fails (CI) or skips when it is down."""
    url = BROKERS[broker]
    try:
        check_reachable(url)
        check_reachable(BACKEND)
    except BrokerUnreachable as exc:
        if brokers_required():
            pytest.fail(f"real-broker tests are mandatory here (CI): {exc}", pytrace=False)
        pytest.skip(reason=f"{exc}; start RabbitMQ and Redis on loopback to run these tests")
    return RealBrokerRunner(
        "realapp:app",
        url,
        backend_url=BACKEND,
        track=("realapp.effect",),
        visibility_timeout=VISIBILITY_TIMEOUT,
        **options,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def make_runner() -> Callable[..., RealBrokerRunner]:
    return real_runner


@pytest.fixture(scope="session", params=sorted(BROKERS))
def runner(request: pytest.FixtureRequest) -> Iterator[RealBrokerRunner]:
    with real_runner(request.param) as real:
        yield real


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under ``-n 2 --dist loadgroup`` each broker's scenarios share one xdist worker (and one
    real worker): the two brokers run side by side, each scenario waiting on its own."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        broker = callspec.params.get("runner") if callspec is not None else None
        if broker:
            item.add_marker(pytest.mark.xdist_group(broker))
