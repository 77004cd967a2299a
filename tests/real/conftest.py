"""Real-broker conformance: brokers on loopback, mandatory in CI, a skip elsewhere."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from pytest_celery_faults.real.runner import BrokerUnreachable, RealBrokerRunner, check_reachable

BROKERS = {
    "rabbitmq": "amqp://guest:guest@127.0.0.1:5672//",
    "redis": "redis://127.0.0.1:6379/13",
}
BACKEND = "redis://127.0.0.1:6379/14"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "real_broker: runs a real prefork worker on RabbitMQ or Redis (loopback)"
    )


def brokers_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("CELERY_FAULTS_REQUIRE_BROKERS") == "1"


@pytest.fixture(scope="session", params=sorted(BROKERS))
def runner(request: pytest.FixtureRequest) -> Iterator[RealBrokerRunner]:
    url = BROKERS[request.param]
    try:
        check_reachable(url)
        check_reachable(BACKEND)
    except BrokerUnreachable as exc:
        if brokers_required():
            pytest.fail(f"real-broker tests are mandatory here (CI): {exc}", pytrace=False)
        pytest.skip(reason=f"{exc}; start RabbitMQ and Redis on loopback to run these tests")
    with RealBrokerRunner(
        "realapp:app", url, backend_url=BACKEND, track=("realapp.effect",)
    ) as real:
        yield real
