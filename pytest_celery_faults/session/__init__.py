"""What a test session does with faults beyond one test: the eager gate, the report, the audit."""
