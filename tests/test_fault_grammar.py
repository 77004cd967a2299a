"""The fault-spec grammar: what reads, what round-trips, and what each mistake says.

Every mistake is one line that names the bad token and ends with the valid forms,
whether it comes from code, a marker or the command line, and a user never sees
a traceback for it.
"""

from __future__ import annotations

import re

import pytest
from celery import Celery

from pytest_celery_faults import CeleryFaults, FaultSpecError, parse_spec
from pytest_celery_faults.grammar import BOUNDARY_KINDS, VALID_FORMS, FaultSpec, Step


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("sigkill@2", "sigkill@2"),
        (" sigterm@0 ", "sigterm@0"),
        ("exit(3)@1", "exit(3)@1"),
        ("exit(0)@0", "exit(0)@0"),
        ("exit@1", "exit(1)@1"),  # sys.exit()'s own default code
        ("power_loss@1", "power_loss@1"),
        ("ack_lost", "ack_lost"),
        ("redeliver", "redeliver"),
        ("redeliver*1", "redeliver"),
        ("redeliver*2", "redeliver*2"),
        ("raise(requests.ConnectionError)@1", "raise(requests.ConnectionError)@1"),
        ("raise( ValueError )@0", "raise(ValueError)@0"),
        ("timeout@1", "timeout@1"),
        ("soft_timeout@1", "soft_timeout@1"),
        ("warm_shutdown@0", "warm_shutdown@0"),
        ("cold_shutdown@2", "cold_shutdown@2"),
        ("sigkill@1;power_loss@0", "sigkill@1;power_loss@0"),
        (" sigkill@1 ; ok ", "sigkill@1;ok"),
        ("ok;sigkill@1", "ok;sigkill@1"),
        ("sigkill@007", "sigkill@7"),
        ("proj.tasks.charge:sigkill@1", "proj.tasks.charge:sigkill@1"),
        ("proj.tasks.charge: sigkill@1", "proj.tasks.charge:sigkill@1"),
        ("proj.tasks.charge:redeliver*3", "proj.tasks.charge:redeliver*3"),
        # routing-style names hold colons: the prefix ends at the last ':' before the fault
        ("low_priority:send:sigkill@1", "low_priority:send:sigkill@1"),
        ("a:b:c:raise(ValueError)@0;ok", "a:b:c:raise(ValueError)@0;ok"),
        ("low_priority:send:redeliver*2", "low_priority:send:redeliver*2"),
        ("sigkill@999999", "sigkill@999999"),
        ("sigkill@0000001", "sigkill@1"),  # leading zeros are no digits of size
    ],
)
def test_valid_specs_round_trip(text: str, canonical: str) -> None:
    spec = parse_spec(text)
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec
    assert parse_spec(spec) is spec  # a parsed spec passes through


def test_a_task_name_with_colons_is_targeted_whole() -> None:
    spec = parse_spec("low_priority:send:sigkill@1")
    assert spec.task == "low_priority:send"
    assert spec.matches("low_priority:send") and not spec.matches("send")


def test_a_spec_reads_into_steps_for_successive_deliveries() -> None:
    spec = parse_spec("proj.charge:sigkill@1;ok;exit(2)@0")
    assert spec == FaultSpec(
        steps=(Step("sigkill", at=1), Step("ok"), Step("exit", at=0, code=2)),
        task="proj.charge",
    )
    assert [str(spec.step_for(n)) for n in (1, 2, 3)] == ["sigkill@1", "ok", "exit(2)@0"]
    assert spec.step_for(4) is None and spec.step_for(0) is None
    assert spec.fault_count == 2  # `ok` is no fault
    assert spec.matches("proj.charge") and not spec.matches("proj.refund")
    assert parse_spec("redeliver*3") == FaultSpec(redeliver=3)


#: (spec, the problem the message names). The whole message must read
#: "invalid fault spec '<spec>': <problem>; valid forms: <VALID_FORMS>".
MALFORMED = [
    ("sigkil@2", "unknown fault 'sigkil' in 'sigkil@2'"),
    ("SIGKILL@1", "cannot read 'SIGKILL@1'"),
    ("sigkill", "'sigkill' needs a side-effect boundary, as in sigkill@0"),
    ("exit(3)", "'exit(3)' needs a side-effect boundary, as in exit@0"),
    ("sigkill@-1", "'-1' in 'sigkill@-1' is not a whole number >= 0"),
    ("sigkill@two", "'two' in 'sigkill@two' is not a whole number >= 0"),
    ("sigkill@1@2", "cannot read 'sigkill@1@2'"),
    ("exit(x)@1", "'x' in 'exit(x)@1' is not a whole number >= 0"),
    ("exit()@1", "'' in 'exit()@1' is not a whole number >= 0"),
    (
        "raise()@1",
        "'raise()@1' needs an exception, as in raise(requests.ConnectionError)@1",
    ),
    (
        "raise(not a name)@1",
        "'raise(not a name)@1' needs an exception, as in raise(requests.ConnectionError)@1",
    ),
    ("sigkill@1;;exit@0", "an empty step between ';'"),
    ("sigkill@1;", "an empty step between ';'"),
    ("a;;b", "unknown fault 'a' in 'a'"),  # the first bad token is named
    ("redeliver*0", "in 'redeliver*0' the count must be at least 1"),
    ("proj.charge:redeliver*0", "in 'redeliver*0' the count must be at least 1"),
    ("redeliver*x", "'x' in 'redeliver*x' is not a whole number >= 0"),
    ("redeliver*-1", "'-1' in 'redeliver*-1' is not a whole number >= 0"),
    (
        "redeliver;sigkill@1",
        "'redeliver' applies to every delivery and cannot be chained with ';'",
    ),
    ("redeliver*2;ok", "'redeliver' applies to every delivery and cannot be chained with ';'"),
    ("sigkill@1;redeliver", "'redeliver' cannot be chained with other steps"),
    ("ack_lost@1", "'ack_lost@1': 'ack_lost' takes no argument and no @N"),
    ("ok(1)", "'ok(1)': 'ok' takes no argument and no @N"),
    ("sigkill(9)@1", "'sigkill(9)@1': 'sigkill' takes no argument"),
    ("@@", "cannot read '@@'"),
    # ASCII digits only: a superscript or an Arabic-Indic digit is no number here
    ("sigkill@\u00b2", "'\u00b2' in 'sigkill@\u00b2' is not a whole number >= 0"),
    ("sigkill@\u0661", "'\u0661' in 'sigkill@\u0661' is not a whole number >= 0"),
    ("exit(\u0663)@1", "'\u0663' in 'exit(\u0663)@1' is not a whole number >= 0"),
    ("redeliver*\u0662", "'\u0662' in 'redeliver*\u0662' is not a whole number >= 0"),
    ("sigkill@1000000", "'1000000' in 'sigkill@1000000' is too large (at most 6 digits)"),
    ("exit(256)@1", "'exit(256)@1': an exit code is 0 to 255"),
    (
        "1abc:sigkill@1",
        "'1abc' before the last ':' is not a task name (letters, digits, '_', '.', '-', ':')",
    ),
    (
        "a b:sigkill@1",
        "'a b' before the last ':' is not a task name (letters, digits, '_', '.', '-', ':')",
    ),
]


@pytest.mark.parametrize(("text", "problem"), MALFORMED)
def test_a_malformed_spec_names_the_bad_token_and_the_valid_forms(text: str, problem: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_spec(text)
    assert (
        str(raised.value) == f"invalid fault spec {text!r}: {problem}; valid forms: {VALID_FORMS}"
    )


@pytest.mark.parametrize(
    ("text", "length"),
    [
        ("sigkill@" + "9" * 5000, 5008),  # past Python's int-from-text limit
        ("x" * 100_000, 100_000),
        ("sigkill@1;" + "y" * 100_000, 100_010),
        ("a" * 100_000 + ":sigkil@1", 100_009),
    ],
    ids=["5000-digits", "100KB-kind", "100KB-second-step", "100KB-task"],
)
def test_a_huge_spec_is_echoed_cut_short(text: str, length: int) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_spec(text)
    message = str(raised.value)
    assert f"invalid fault spec {text[:60]!r}... ({length} characters): " in message
    assert message.endswith(f"; valid forms: {VALID_FORMS}")
    # One line: the echo cut to 60 characters, the problem, the valid forms; never the input.
    assert len(message) < len(VALID_FORMS) + 400 and "\n" not in message


@pytest.mark.parametrize("text", ["", "   ", " ; ", "proj.charge:"])
def test_an_empty_spec_says_so(text: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_spec(text)
    assert str(raised.value) == f"empty fault spec {text!r}; valid forms: {VALID_FORMS}"


@pytest.mark.parametrize(
    ("value", "shown"),
    [(3, "int 3"), (None, "NoneType None"), (["sigkill@1"], "list ['sigkill@1']")],
)
def test_a_non_string_is_refused_by_type(value: object, shown: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_spec(value)  # type: ignore[arg-type]
    assert str(raised.value) == (
        f"a fault spec is a string or a FaultSpec, not {shown}; valid forms: {VALID_FORMS}"
    )


@pytest.mark.parametrize("kind", BOUNDARY_KINDS)
def test_the_example_a_missing_boundary_suggests_is_a_valid_spec(kind: str) -> None:
    with pytest.raises(FaultSpecError) as raised:
        parse_spec(kind)
    suggested = re.search(r"as in (\S+);", str(raised.value))
    assert suggested is not None
    parse_spec(suggested.group(1))


def test_an_unimportable_exception_is_refused_when_armed(app: Celery) -> None:
    with CeleryFaults(app, check_unfired=False) as faults:
        with pytest.raises(FaultSpecError) as missing_module:
            faults.inject("raise(not_a_module.Boom)@0")
        with pytest.raises(FaultSpecError) as missing_name:
            faults.inject("raise(builtins.NoSuchError)@0")
        with pytest.raises(FaultSpecError) as not_exception:
            faults.inject("raise(builtins.len)@0")
        assert faults.plan.armed == []  # nothing was armed
    assert str(missing_module.value) == (
        "invalid fault spec 'raise(not_a_module.Boom)@0': cannot import "
        f"'not_a_module.Boom' (No module named 'not_a_module'); valid forms: {VALID_FORMS}"
    )
    assert str(missing_name.value).startswith(
        "invalid fault spec 'raise(builtins.NoSuchError)@0': cannot import "
        "'builtins.NoSuchError' ("
    )
    assert str(not_exception.value) == (
        "invalid fault spec 'raise(builtins.len)@0': 'builtins.len' is not an exception "
        f"class; valid forms: {VALID_FORMS}"
    )
    for raised in (missing_module, missing_name, not_exception):
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize("text", ["raise(not_a_module.Boom)@0", "raise(builtins.len)@0"])
def test_an_unimportable_exception_lists_the_valid_forms(app: Celery, text: str) -> None:
    with (
        CeleryFaults(app, check_unfired=False) as faults,
        pytest.raises(FaultSpecError) as raised,
    ):
        faults.inject(text)
    assert str(raised.value).endswith(f"; valid forms: {VALID_FORMS}")


# -- through pytest: the command line and the markers ---------------------------

APP_CONFTEST = """
import pytest
from celery import Celery

@pytest.fixture
def celery_faults_app():
    return Celery("grammar", set_as_current=False)
"""


def stderr_lines(result: pytest.RunResult) -> list[str]:
    return [line for line in result.stderr.lines if line.strip()]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("sigkil@1", "invalid fault spec 'sigkil@1': unknown fault 'sigkil' in 'sigkil@1'"),
        (
            "redeliver*0",
            "invalid fault spec 'redeliver*0': in 'redeliver*0' the count must be at least 1",
        ),
    ],
)
def test_a_bad_celery_faults_option_is_a_one_line_usage_error(
    pytester: pytest.Pytester, value: str, problem: str
) -> None:
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest(f"--celery-faults={value}")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert stderr_lines(result) == [
        f"ERROR: --celery-faults: {problem}; valid forms: {VALID_FORMS}"
    ]
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


#: (marker, the error after "<nodeid>: bad celery-faults marker: ", as a regex)
BAD_MARKERS = [
    (
        "celery_faults('sigkill@x')",
        re.escape(
            "invalid fault spec 'sigkill@x': 'x' in 'sigkill@x' is not a whole number >= 0; "
            f"valid forms: {VALID_FORMS}"
        ),
    ),
    (
        "celery_faults(3)",
        re.escape(
            f"a fault spec is a string or a FaultSpec, not int 3; valid forms: {VALID_FORMS}"
        ),
    ),
    (
        "celery_faults(profile='kafka')",
        re.escape("unknown broker profile 'kafka'; expected one of 'rabbitmq', 'redis', 'sqs'"),
    ),
    ("celery_faults(workers=0)", re.escape("workers=0: expected a whole number >= 1")),
    # Python 3.13 adds the suggestion to the TypeError.
    (
        "celery_faults(worker=2)",
        r".*unexpected keyword argument 'worker'(\. Did you mean 'workers'\?)?",
    ),
    ("redeliver(times=0)", re.escape("times=0: expected a whole number >= 1")),
    ("crash_after(-1)", re.escape("n=-1: expected a whole number >= 0")),
    (
        "crash_after(1, how='explode')",
        re.escape("how='explode': expected one of 'sigkill', 'sigterm', 'exit', 'power_loss'"),
    ),
    ("fault_sweep(max_effects=-1)", re.escape("max_effects=-1: expected a whole number >= 0")),
    (
        "fault_sweep(hows=('bogus',))",
        re.escape("hows: 'bogus' is not a fault kind with a boundary"),
    ),
    (
        "fault_sweep(max_effects=50000)",
        re.escape(
            "max_effects=50000: expected at most 100 (each kind at each boundary is a test "
            "case of its own)"
        ),
    ),
    ("celery_faults(seed=[1])", re.escape("seed=[1]: expected a whole number or None")),
    ("celery_faults(seed='abc')", re.escape("seed='abc': expected a whole number or None")),
    ("celery_faults(seed=True)", re.escape("seed=True: expected a whole number or None")),
    (
        "celery_faults(allow_unfired='no')",
        re.escape("allow_unfired='no': expected True or False"),
    ),
    (
        "celery_faults(profile=None)",
        re.escape("profile=None: expected one of 'rabbitmq', 'redis', 'sqs'"),
    ),
]


def test_bad_marker_arguments_are_one_line_collection_errors(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_markers="import pytest\n"
        + "".join(
            f"\n\n@pytest.mark.{marker}\ndef test_{n}():\n    pass\n"
            for n, (marker, _) in enumerate(BAD_MARKERS)
        )
    )
    result = pytester.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    lines = stderr_lines(result)
    assert lines[0].startswith("ERROR: "), lines
    # one line per bad marker, each naming its test (in collection order: pytest-randomly
    # may shuffle the inner run)
    errors = dict(line.removeprefix("ERROR: ").split(": ", 1) for line in lines)
    assert len(errors) == len(lines) == len(BAD_MARKERS), result.stderr.str()
    for n, (marker, error) in enumerate(BAD_MARKERS):
        line = errors[f"test_markers.py::test_{n}"]
        assert re.fullmatch("bad celery-faults marker: " + error, line), (marker, line)
    assert "Traceback" not in result.stdout.str() + result.stderr.str()


@pytest.mark.parametrize(
    ("marker", "option"),
    [
        ("@pytest.mark.celery_faults('raise(not_a_module.Boom)@1')", None),
        ("", "--celery-faults=raise(not_a_module.Boom)@1"),
    ],
    ids=["marker", "option"],
)
def test_an_unimportable_exception_in_a_marker_or_option_is_a_usage_error(
    pytester: pytest.Pytester, marker: str, option: str | None
) -> None:
    pytester.makeconftest(APP_CONFTEST)
    pytester.makepyfile(f"import pytest\n\n{marker}\ndef test_x(celery_faults):\n    pass\n")
    result = pytester.runpytest(*([option] if option else []))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    where = "test_an_unimportable_exception_in_a_marker_or_option_is_a_usage_error.py::test_x: "
    source = "--celery-faults: " if option else f"{where}bad celery-faults marker: "
    assert stderr_lines(result) == [
        f"ERROR: {source}invalid fault spec 'raise(not_a_module.Boom)@1': cannot import "
        f"'not_a_module.Boom' (No module named 'not_a_module'); valid forms: {VALID_FORMS}"
    ]


def test_the_option_can_name_an_exception_of_the_project_under_test(
    pytester: pytest.Pytester,
) -> None:
    """The option's exception may live beside the tests; it is imported, then armed."""
    pytester.makeconftest(APP_CONFTEST)
    pytester.makepyfile(
        grammar_project_errors="class PaymentDeclined(Exception):\n    pass\n",
        test_project_exception="""
            import grammar_project_errors

            def test_x(celery_faults):
                assert celery_faults.plan.armed[0].spec.steps[0].exception_class() is (
                    grammar_project_errors.PaymentDeclined
                )
        """,
    )
    result = pytester.runpytest("--celery-faults=raise(grammar_project_errors.PaymentDeclined)@0")
    result.assert_outcomes(passed=1)
