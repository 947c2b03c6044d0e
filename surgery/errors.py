"""User-facing errors: the CLI prints their message as one line and exits non-zero."""


class SurgeryError(Exception):
    """A problem with the user's input (folder, data, arguments), not a bug in the tool."""
