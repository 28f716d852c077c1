"""The package version, kept in the engine so that `prg_fast.info()` can report it without
importing anything above the engine."""
__version__ = "0.1.0"
