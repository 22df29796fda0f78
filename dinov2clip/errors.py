"""Exception types that front-ends map onto user-facing messages."""


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, CLI exit code 2."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its message's first line, or its type where it says nothing."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class ImageError(OSError):
    """One image could not be read or decoded. Subclasses OSError so tools that skip
    unreadable files (clip-retrieval, PIL users) skip ours too."""
