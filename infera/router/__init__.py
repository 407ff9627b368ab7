"""Routing requests among engine replicas (round-robin, least-loaded, cache-aware, longest-prefix): pure
Python over block hashes and request counts, shared by the Ray replica pool and the cluster simulator."""
from infera.router.prefix_index import PrefixIndex, block_hashes
from infera.router.router import DEFAULT_CACHE_THRESHOLD, DEFAULT_PREFILL_WEIGHT, POLICIES, RouteRequest, Router

__all__ = ["DEFAULT_CACHE_THRESHOLD", "DEFAULT_PREFILL_WEIGHT", "POLICIES", "PrefixIndex", "RouteRequest", "Router",
           "block_hashes"]
