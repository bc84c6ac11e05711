"""The data plane: moving disk bytes, below the drivers and above the formats.

- :mod:`app.dataplane.core`: the extent pipeline (source -> stages -> sink over
  bounded queues), its options, progress record, statistics and errors.
- :mod:`app.dataplane.stages`: zero detection, the ``vmd1`` digest, the resume skip,
  the throttle, and the image-writer sink.
- :mod:`app.dataplane.convert`: one image into another (:func:`~app.dataplane.convert.convert`).
- :mod:`app.dataplane.throttle`: clocks and the token bucket.

It imports only :mod:`app.formats` and :mod:`app.errors`: no database, no driver, no
engine (the layers contract in pyproject.toml holds it there).
"""
