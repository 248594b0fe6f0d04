"""sockexec_py: a sockexec-compatible exec broker on trio.

The sans-IO core (:mod:`.netstring`, :mod:`.protocol`, :mod:`.events`) contains no
networking code at all; the server and the clients drive the same state machines.
"""

from ._version import __version__
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError, SockexecError
from .events import ArgvReady, Exited, InputEnded, Output, StdinClosed, StdinData
from .netstring import Decoder
from .protocol import ClientSession, ServerLimits, ServerSession

__all__ = [
    "ArgvReady",
    "ClientSession",
    "Decoder",
    "Exited",
    "InputEnded",
    "LocalProtocolError",
    "Output",
    "ProtocolError",
    "RemoteProtocolError",
    "ServerLimits",
    "ServerSession",
    "SockexecError",
    "StdinClosed",
    "StdinData",
    "__version__",
]
