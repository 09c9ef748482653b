"""The one exception family for bad input: its message names the file, node or value at fault.

The CLI prints it as one line and exits 2; the pytest plugin turns it into a failure or skip with that message.
"""


class WanBenchError(Exception):
    """Bad input or an unusable environment, explained in the message (never a bare traceback)."""


class WorkflowError(WanBenchError, ValueError):
    """A ComfyUI workflow file that cannot be turned into run configurations.

    The message names the file and, where one is at fault, the node id, its type and what was expected.
    """
