"""Real-broker mode: the same faults on a real prefork worker, compared with the emulation."""
