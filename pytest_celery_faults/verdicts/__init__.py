"""Judging what ran: scenario classes, idempotency sweeps, and the checks on task code."""
