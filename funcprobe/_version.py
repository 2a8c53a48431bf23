"""funcprobe's version, in a module of its own so that any module can report it without importing the package (and
through it everything the package exports)."""

__version__ = "0.1.0"
