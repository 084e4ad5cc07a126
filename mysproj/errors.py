"""Error kinds that decide how a stage exits, and so whether Kubernetes retries it."""

# One fixed exit code for input/config problems: retrying cannot help, so the Job's podFailurePolicy
# (and the pipeline controller) treat it as final. Any other non-zero exit is retryable.
EXIT_BAD_INPUT = 64


class BadInput(Exception):
    """Bad data, config or arguments: the message names the file/field and what to do; never retried."""


class IncompleteOutput(BadInput):
    """A stage output has no valid `_SUCCESS.json` manifest (missing, or its files do not match it)."""
