"""Platform drivers: the kit (``kit/``), one package per platform, and the registry
of their specs (``registry.py``). See ``docs/drivers.md``."""
