"""The errors every layer raises, and the one way the project shows an exception in one line.

The bottom of the package with `settings` and `messages`: it imports nothing of ours.
"""


class ModelSourceError(RuntimeError):
    """The model cannot be found, fetched or loaded; the message says which and what to do."""


def one_line(exc: BaseException, limit: int = 300, *, last: bool = False) -> str:
    """`exc` as one line for a log or an error message: its first non-blank line (its last with
    `last=True`, for wrappers such as Ray's that put the cause at the end), whitespace collapsed,
    at most `limit` characters; its type's name when it has no message."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return (lines[-1] if last else lines[0])[:limit]
