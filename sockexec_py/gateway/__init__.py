"""The HTTP/WebSocket gateway (``sockexec-gateway``): the broker's one-shot, streaming
and duplex modes over HTTP, through the same Unix-socket protocol (it spawns nothing
itself). Needs the ``[gateway]`` extra; :mod:`.app` holds the ASGI application.
"""
