"""The HTTP/WebSocket gateway (``sockexec-gateway``): the broker's one-shot, streaming
and duplex modes over HTTP, through the same Unix-socket protocol (it spawns nothing
itself), and with ``--data-dir`` the jobs API. Needs the ``[gateway]`` extra;
:mod:`.app` holds the ASGI application, :mod:`.api` the typed routes and the OpenAPI
document made from :mod:`.models`, :mod:`.jobs_api` the jobs endpoints.
"""
