"""Test helper: a request sent over and over on a thread while a block changes what is served (new versions,
new items), collecting every answer and every `ServingError` (the "no failed request" checks)."""

import contextlib
import threading


@contextlib.contextmanager
def polled(call):
    """Run `call()` in a loop on a thread for the duration of the block; yields `(answers, errors)`, the lists
    it fills (answers in order; errors: the `export.server.errors.ServingError`s raised)."""
    from export.server.errors import ServingError

    answers, errors, stop = [], [], threading.Event()

    def loop():
        while not stop.is_set():
            try:
                answers.append(call())
            except ServingError as err:
                errors.append(err)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield answers, errors
    finally:
        stop.set()
        thread.join(30)
