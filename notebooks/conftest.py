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

``NOTEBOOK_TIMING=<file.jsonl>`` records one line per executed code cell: the client's time for the
cell, the kernel's (busy to idle), ``wait_after_idle`` (when the client received the cell's reply,
minus when the kernel went idle: a lost wake-up shows as a wait as long as the timeout) and the
Output-widget messages the client sent while the cell ran; the terminal summary gives the largest
wait and the slowest cell. Used to check the fix:
``NOTEBOOK_TIMING=runs/nb-timing.jsonl WORKBENCH_SMOKE=1 pytest notebooks/*.ipynb --nbmake``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from datetime import datetime

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


# --- optional per-cell timing (NOTEBOOK_TIMING) ----------------------------------------------

_TIMING = os.environ.get("NOTEBOOK_TIMING")
_rows: list[dict] = []


def _timestamp(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _install_timing(path: str) -> None:
    """Wrap nbclient so that each executed code cell appends one JSON line to ``path``."""
    import nbclient.client
    import nbclient.output_widget
    from jupyter_client.channels import AsyncZMQSocketChannel

    state = {"reply_at": None, "widget_sends": 0}
    get_msg, execute_cell = AsyncZMQSocketChannel.get_msg, nbclient.client.NotebookClient.async_execute_cell
    publish = nbclient.output_widget.OutputWidget._publish_msg

    async def timed_get_msg(self, timeout=None):
        msg = await get_msg(self, timeout)
        if msg.get("header", {}).get("msg_type") == "execute_reply":
            state["reply_at"] = time.time()
        return msg

    def counted_publish(self, *args, **kwargs):
        state["widget_sends"] += 1
        return publish(self, *args, **kwargs)

    async def timed_execute_cell(self, cell, cell_index, *args, **kwargs):
        state.update(reply_at=None, widget_sends=0)
        start = time.time()
        try:
            return await execute_cell(self, cell, cell_index, *args, **kwargs)
        finally:
            if cell.get("cell_type") == "code":
                timing = cell.get("metadata", {}).get("execution", {})  # nbmake sets record_timing
                busy, idle = _timestamp(timing.get("iopub.status.busy")), _timestamp(timing.get("iopub.status.idle"))
                row = {"notebook": os.environ.get("PYTEST_CURRENT_TEST", "").split("::")[0], "cell": cell_index,
                       "first_line": cell.source.splitlines()[0][:60] if cell.source else "",
                       "client_s": time.time() - start, "kernel_s": idle - busy if busy and idle else None,
                       "wait_after_idle": state["reply_at"] - idle if state["reply_at"] and idle else None,
                       "widget_sends": state["widget_sends"]}
                _rows.append(row)
                with open(path, "a") as f:
                    f.write(json.dumps(row) + "\n")

    AsyncZMQSocketChannel.get_msg = timed_get_msg
    nbclient.client.NotebookClient.async_execute_cell = timed_execute_cell
    nbclient.output_widget.OutputWidget._publish_msg = counted_publish


def pytest_configure(config):
    if _TIMING:
        _install_timing(_TIMING)


def pytest_terminal_summary(terminalreporter):
    waits = [r for r in _rows if r["wait_after_idle"] is not None]
    if not _TIMING or not _rows:
        return
    slowest = max(_rows, key=lambda r: r["client_s"])
    line = (f"notebook cells: {len(_rows)} (timing in {_TIMING}); slowest {slowest['client_s']:.1f} s "
            f"({slowest['notebook']} cell {slowest['cell']})")
    if waits:
        worst = max(waits, key=lambda r: r["wait_after_idle"])
        line += f"; longest wait for a reply after the kernel went idle {worst['wait_after_idle']:.3f} s"
    terminalreporter.write_line(line)
