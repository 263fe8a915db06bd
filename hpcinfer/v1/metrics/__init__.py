"""Metric types and the snapshot LLM.get_metrics() returns (``reader``)."""
