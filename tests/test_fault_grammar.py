"""The fault-spec grammar: what reads, what round-trips, and what each mistake says."""

from __future__ import annotations

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults, FaultSpecError, parse_spec
from pytest_celery_faults.faults import VALID_FORMS


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("sigkill@2", "sigkill@2"),
        (" sigterm@0 ", "sigterm@0"),
        ("exit(3)@1", "exit(3)@1"),
        ("exit@1", "exit(1)@1"),
        ("power_loss@1", "power_loss@1"),
        ("ack_lost", "ack_lost"),
        ("redeliver", "redeliver"),
        ("redeliver*2", "redeliver*2"),
        ("raise(requests.ConnectionError)@1", "raise(requests.ConnectionError)@1"),
        ("timeout@1", "timeout@1"),
        ("soft_timeout@1", "soft_timeout@1"),
        ("warm_shutdown@0", "warm_shutdown@0"),
        ("cold_shutdown@2", "cold_shutdown@2"),
        ("sigkill@1;power_loss@0", "sigkill@1;power_loss@0"),
        ("ok;sigkill@1", "ok;sigkill@1"),
        ("proj.tasks.charge:sigkill@1", "proj.tasks.charge:sigkill@1"),
        ("proj.tasks.charge:redeliver*3", "proj.tasks.charge:redeliver*3"),
    ],
)
def test_valid_specs_round_trip(text: str, canonical: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec


def test_steps_apply_to_successive_deliveries() -> None:
    spec = parse_spec("proj.charge:sigkill@1;exit(2)@0")
    assert spec.task == "proj.charge"
    assert [str(spec.step_for(n)) for n in (1, 2)] == ["sigkill@1", "exit(2)@0"]
    assert spec.step_for(3) is None
    assert spec.fault_count == 2


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("sigkil@2", "unknown fault 'sigkil' in 'sigkil@2'"),
        ("sigkill", "'sigkill' needs a side-effect boundary, as in sigkill@0"),
        ("sigkill@-1", "'-1' in 'sigkill@-1' is not a whole number >= 0"),
        ("sigkill@two", "'two' in 'sigkill@two' is not a whole number >= 0"),
        ("exit(x)@1", "'x' in 'exit(x)@1' is not a whole number >= 0"),
        ("raise()@1", "'raise()@1' needs an exception"),
        ("sigkill@1;;exit@0", "an empty step between ';'"),
        ("redeliver*0", "in 'redeliver*0' the count must be at least 1"),
        ("redeliver;sigkill@1", "'redeliver' applies to every delivery and cannot be chained"),
        ("sigkill@1;redeliver", "'redeliver' cannot be chained with other steps"),
        ("ack_lost@1", "'ack_lost@1': 'ack_lost' takes no argument and no @N"),
        ("sigkill(9)@1", "'sigkill(9)@1': 'sigkill' takes no argument"),
        ("", "empty fault spec ''"),
        ("@@", "cannot read '@@'"),
    ],
)
def test_malformed_specs_name_the_bad_token_and_the_valid_forms(text: str, names: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_spec(text)
    message = str(raised.value)
    assert names in message
    assert message.endswith(f"valid forms: {VALID_FORMS}")
    assert "\n" not in message


def test_a_non_string_is_refused_by_type() -> None:
    with pytest.raises(
        FaultSpecError, match=r"a fault spec is a string or a FaultSpec, not int 3"
    ):
        parse_spec(3)  # type: ignore[arg-type]


def test_an_unimportable_exception_is_refused_when_armed(app: Celery) -> None:
    with CeleryFaults(app, check_unfired=False) as faults:
        with pytest.raises(FaultSpecError, match=r"cannot import 'not_a_module\.Boom'"):
            faults.inject("raise(not_a_module.Boom)@0")
        with pytest.raises(FaultSpecError, match=r"'builtins\.len' is not an exception class"):
            faults.inject("raise(builtins.len)@0")


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ("celery_faults('sigkill@x')", "'x' in 'sigkill@x' is not a whole number >= 0"),
        ("celery_faults(profile='kafka')", "unknown broker profile 'kafka'"),
        ("celery_faults(workers=0)", "workers=0: expected a whole number >= 1"),
        ("celery_faults(worker=2)", "unexpected keyword argument 'worker'"),
        ("redeliver(times=0)", "times=0: expected a whole number >= 1"),
        ("crash_after(-1)", "n=-1: expected a whole number >= 0"),
    ],
)
def test_bad_marker_arguments_are_one_line_collection_errors(
    pytester: pytest.Pytester, marker: str, message: str
) -> None:
    pytester.makepyfile(
        f"""
        import pytest

        @pytest.mark.{marker}
        def test_x():
            pass
        """
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*bad celery-faults marker: *{message}*"])
    assert "Traceback" not in result.stderr.str()
