"""The cluster simulator: a request trace replayed through replicas of the real Scheduler and
BlockManager on a simulated clock, step times from a fitted cost model, requests routed by the
Router (``infera simulate``)."""
