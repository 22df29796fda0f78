"""Exception types that front-ends map onto user-facing messages."""


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, CLI exit code 2."""


class ImageError(OSError):
    """One image could not be read or decoded. Subclasses OSError so tools that skip
    unreadable files (clip-retrieval, PIL users) skip ours too."""
