"""Notebook runs under nbmake: keep the notebook client from missing a cell's reply.

With jupyter_client >= 7.4.2, ``Session.send`` on a ``zmq.asyncio`` socket sends through a plain
shadow of the socket. That send lets libzmq process the socket's pending commands, which can
consume the socket's edge-triggered "readable" signal for a reply that has already arrived; the
asyncio socket never looks at its events again, so a pending ``await socket.poll(timeout)``
sleeps until the timeout and only then reads the reply. nbclient sends on the shell socket while
it waits for a cell's reply whenever an ipywidgets Output widget captures output (it syncs the
widget's state back to the kernel), so such cells finished only when ``--nbmake-timeout`` fired.
Upstream: jupyter/nbclient#312 (open; the fix in jupyter/nbclient#311 is not merged) and
jupyter/jupyter_client#1059 (open).

The fix here: while a notebook runs, ``Session.send`` is wrapped so that after a send on an
asyncio socket it reads the socket's ``zmq.EVENTS`` through the asyncio socket itself. pyzmq's
asyncio socket schedules its pending recv and poll futures whenever a read of ``EVENTS`` shows
the socket readable (its edge-triggered handling), so the waiting poll wakes at once. The wrapper
is installed around each notebook item only (``pytest_runtest_call`` of the items collected from
this folder) and removed afterwards.

The notebooks also draw into widgets only when a control changes (``workbench.viz.redraw_on_change``),
so a headless run sends nothing while it waits; this wrapper covers any widget output that remains.
"""

from __future__ import annotations

import functools

import pytest


def _wake_after_send(send):
    import zmq
    import zmq.asyncio

    @functools.wraps(send)
    def wrapped(self, stream, *args, **kwargs):
        result = send(self, stream, *args, **kwargs)
        if isinstance(stream, zmq.asyncio.Socket) and not stream.closed:
            # reading EVENTS through the asyncio socket (not the shadow) makes pyzmq schedule the
            # pending poll / recv futures if a message is readable: the lost wake-up, restored
            stream.get(zmq.EVENTS)
        return result

    wrapped.__wrapped_for_nbclient_312__ = True
    return wrapped


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    from jupyter_client.session import Session

    original = Session.send
    if getattr(original, "__wrapped_for_nbclient_312__", False):  # already wrapped (nested items)
        yield
        return
    Session.send = _wake_after_send(original)
    try:
        yield
    finally:
        Session.send = original
