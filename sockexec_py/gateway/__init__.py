"""The HTTP/WebSocket gateway: the broker's one-shot, streaming and duplex modes over
HTTP, through the same Unix-socket protocol (it spawns nothing itself)."""

from .app import Gateway
from .settings import GatewaySettings

__all__ = ["Gateway", "GatewaySettings"]
