"""The terminal summary of a session: what the plugin ran, what the gate proved, what failed.

One line each: the totals, each ``--celery-faults`` spec and the tests it fired
in, each failed test with the command that replays it, each verdict other than
ok in plain words, each warning once, each exemption.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import SessionReport


def summary_lines(
    report: SessionReport, gate_specs: list[str] | None = None, *, allow_unfired: bool = False
) -> list[str]:
    """The terminal summary; ``gate_specs`` are the suite-wide specs, when given."""
    totals = report.totals()
    harnessed = totals["tests"] - totals["gated_tests"]
    lines = [
        f"{harnessed} test(s) used the harness, {totals['gated_tests']} ran tasks "
        f"eagerly through the gate: {totals['tasks_exercised']} task(s) exercised, "
        f"{totals['messages']} message(s), {totals['faults_injected']} fault(s) injected, "
        f"{totals['scenarios']} scenario(s) classed (seed {report.seed})"
    ]
    if gate_specs:
        shown = " ".join(f"--celery-faults={spec!r}" for spec in gate_specs)
        if totals["gated_tests"]:
            lines.append(
                f"the gate ({shown}) ran {totals['gated_runs']} eager call(s) of "
                f"{totals['gated_tasks']} task(s) in {totals['gated_tests']} test(s)"
            )
        if not totals["tests"]:
            lines.append(
                f"warning: the gate ({shown}) exercised nothing: no test used the "
                f"celery_faults harness or ran a task eagerly"
            )
        for spec in gate_specs:
            fired, under = report.fired_in(spec)
            if fired:
                lines.append(
                    f"--celery-faults={spec!r} fired in {fired} of the {under} test(s) "
                    f"that ran tasks under it"
                )
            elif allow_unfired:
                lines.append(
                    f"--celery-faults={spec!r} fired in no test of the session "
                    f"(allowed by --celery-faults-allow-unfired)"
                )
            else:
                lines.append(
                    f"FAILED: --celery-faults={spec!r} fired in no test of the session "
                    f"({under} test(s) ran tasks under it): the gate proved nothing; "
                    f"--celery-faults-allow-unfired accepts this"
                )
    for record in report.records:
        if record.verdict == "failed":
            replay = " ".join(
                f"--celery-faults={spec!r}" for spec in record.specs + record.suite_wide
            )
            how = f" (replay: pytest {record.nodeid!r} {replay})" if replay else ""
            lines.append(f"FAILED {record.nodeid}{how}")
    for record in report.records:
        findings = record.findings()
        for verdict in _PLAIN:
            if verdict in findings:
                specs = ", ".join(repr(spec) for spec in findings[verdict][:8])
                more = len(findings[verdict]) - 8
                tail = f" and {more} more" if more > 0 else ""
                lines.append(f"{verdict} ({_PLAIN[verdict]}): {record.nodeid} under {specs}{tail}")
        for spec in record.suite_wide_unfired:
            lines.append(f"never fired: {spec} in {record.nodeid}")
    warned: dict[str, list[str]] = {}  # each warning once, with the tests that met it
    for record in report.records:
        for warning in record.warnings:
            warned.setdefault(warning, []).append(record.nodeid)
    for warning, nodeids in warned.items():
        if len(nodeids) == 1:
            lines.append(f"warning: {nodeids[0]}: {warning}")
        else:
            lines.append(
                f"warning: {warning} (in {len(nodeids)} tests: {nodeids[0]} and "
                f"{len(nodeids) - 1} more)"
            )
    for nodeid, reason in sorted(report.exempt.items()):
        lines.append(f"exempt from --celery-faults: {nodeid} ({reason})")
    return lines


_PLAIN = {
    "duplicated": "ran again and repeated side effects",
    "diverged": "ran again or ended otherwise, and the world differs",
    "partial": "lost after some side effects, the world half done",
    "lost": "never completed, nothing ran it again",
    "ended_otherwise": "went away after its work was done, nothing lost",
}
