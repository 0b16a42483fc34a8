"""The ``lungmae`` command: thin subcommands over lungmae_core, client/ and server/.

This package is the only place allowed to import both ``client`` and ``server`` (simulation needs both).
"""
