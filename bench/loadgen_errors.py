"""The load generator's one way to fail: ``BenchError`` ends the run with its message.

Every bench module raises it (a phase without progress, a server that died, a reply
that should not happen in a load run); ``loadgen.main`` catches it, still prints
the figures gathered so far, and exits with status 1.
"""


class BenchError(Exception):
    """The run cannot go on; the message says why."""
