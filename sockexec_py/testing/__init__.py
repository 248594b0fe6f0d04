"""Process harnesses shared by the tests and the benchmarks: the broker and the gateway
started as users start them (``python -m ...``), with readiness signalled by the
programs themselves, never guessed with a sleep."""

from .broker import BrokerProcess, HarnessError, wait_until
from .gateway import GatewayProcess

__all__ = ["BrokerProcess", "GatewayProcess", "HarnessError", "wait_until"]
