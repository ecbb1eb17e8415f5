"""Commands of the ``incremental`` CLI that stand apart from the core they call.

Each module has ``add_parser(subparsers)`` and a handler, and is registered by name in
:data:`incremental.cli.SUBCOMMANDS`.
"""
