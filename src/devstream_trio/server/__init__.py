"""The trio hub: HTTP front, control channels and initiations (``hub``), the streaming
endpoint's relays (``streaming``), the registry's SQLite store (``store``), the data folder
(``datafolder``) and the metrics it renders (``metrics``). Every decision it makes comes from
a core machine: ``coordinator``, ``bridge``, ``control``, ``authorization``, ``silence``,
``admission``, ``routes``, ``wire``."""
