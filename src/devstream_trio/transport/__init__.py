"""The low-level transport both sides share: sockets and TLS (``connect``, ``io``), HTTP/1.1
with the WebSocket opening handshake (``http``), and the WebSocket connection (``websocket``)
that drives the core's codec (:mod:`devstream_core.websocket`) over any ``trio.abc.Stream``.
Nothing here knows devices, services or streams."""
