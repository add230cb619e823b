"""Run-time errors a user can act on: the CLI prints the message, never a traceback."""


class RunError(Exception):
    """A problem with the plan, models, data or training that the user must fix.

    The message names what is wrong and where (file, stage, step, loss term) and, where possible, what to do.
    """
