"""The ``python -m ddx`` command line: the dispatcher (`ddx.cli.main`), one module per command
(`ddx.cli.commands`), the config schema and its translation into library arguments
(`ddx.cli.defaults`, `ddx.cli.config`), the ranges of user-given numbers (`ddx.cli.limits`),
process setup (`ddx.cli.runtime`) and restoring models from workdirs (`ddx.cli.restore`).

Configs are read here and nowhere else: library code takes explicit arguments.
"""
