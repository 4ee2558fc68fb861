"""Fake upstreams that speak the real wire protocols, for tests."""
