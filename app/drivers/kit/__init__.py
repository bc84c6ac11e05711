"""What every platform driver shares (see ``docs/drivers.md``).

* :mod:`.connection`: :class:`CloudConnection`, the typed settings and credentials a
  driver is built from (the engines read them from the database, drivers never do);
* :mod:`.spec`: :class:`Role` and :class:`DriverSpec`, the one declaration per platform
  the registry derives the API's schemas and capability checks from;
* :mod:`.session`: :class:`DriverSession`, the session life cycle, blocking SDK calls
  in threads with their errors translated, and polling waits;
* :mod:`.errors`: the cloud error family and the shared network/TLS/HTTP table
  platform tables extend (built on :mod:`app.errormap`);
* :mod:`.power`: shutdown with grace, power on, restore and idempotent snapshots by
  name, built from a few platform primitives;
* :mod:`.tls`: one ``ssl.SSLContext`` from a cloud's TLS options.
"""
