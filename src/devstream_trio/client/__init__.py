"""The trio clients: a device (``device``: its control channel, driven by the core's
``DeviceSession``), a service (``service``: initiates and the registry API), the two kinds of
stream they join (``join``: raw ``HubStream`` in ``stream``, devstream.v1 ``FramedStream`` in
``framed``, driven by the core's ``StreamDriver``), and the local TCP proxies built on them
(``proxy``)."""
