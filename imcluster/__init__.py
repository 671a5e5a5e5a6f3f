"""imcluster: a stateless instant-messaging cluster on Twisted."""

__version__ = "0.1.0"
