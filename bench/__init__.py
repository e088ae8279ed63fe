"""The benchmark harness: the policy workers measured against a bare relay.

Run ``python -m bench`` (``--help`` for the options); the processes it starts
are ``python -m bench.bare_relay`` (the baseline), ``python -m bench.load``
(the open-loop sender) and ``python -m bench.receiver`` (the agents that
receive), besides ``python -m policy_worker`` itself. This package module
stays light on purpose: every child process imports it first.
"""

from bench.config import BenchConfig

__all__ = ["BenchConfig"]
