"""fp8flow.Error: a C++ fp8flow::Error, surfaced in Python with the same message."""

import functools


class Error(RuntimeError):
    """An error reported by the fp8flow C++ library (fp8flow::Error). The message is the library's,
    unchanged: "fp8flow::<op>: <argument>: expected <what>, got <what came>"."""


def translate(fn):
    """Re-raises a RuntimeError carrying an fp8flow::Error message as fp8flow.Error (same text).

    torch turns a C++ exception thrown inside an op into a RuntimeError with the exception's
    what(); the message starts with "fp8flow::" exactly when the library (or the binding, in the
    library's format) raised it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Error:
            raise
        except RuntimeError as e:
            msg = str(e)
            if msg.startswith("fp8flow::"):
                raise Error(msg) from None
            raise

    return wrapper


def call(op, *args):
    """op(*args) with fp8flow errors re-raised as fp8flow.Error."""
    return translate(op)(*args)
