"""The ``python -m ddx`` commands, one module each (dispatched by `ddx.cli`).

Commands read flags and configs, build explicit objects and call library code. Shared flag
definitions and checks live in `ddx.cli.commands.common`.
"""
