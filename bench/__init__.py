"""The framework-neutral benchmark harness."""
