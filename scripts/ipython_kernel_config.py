"""Kernel configuration installed into the environment by ``make install`` (``.venv/etc/ipython``).

ipykernel 7 logs "Kernel is running over TCP without encryption" when its
kernel manager gives it TCP ports and no CurveZMQ keys. That is what the
kernel managers of jupyter-book (myst-nb, jupyter-cache, nbclient) and nbval
do: they create jupyter_client's KernelManager with its defaults (TCP on
127.0.0.1, ``transport_encryption="disabled"``) and offer no setting to
change them. The kernel's ports are bound to the local machine only, so the
notice is noise in every notebook's build log. This filter drops that one
message from the kernel application's log; every other kernel message, and
every warning a notebook's code raises (which lands in the cell's output),
is kept.
"""

import logging


class _DropLocalTcpNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Kernel is running over TCP without encryption" not in record.getMessage()


c = get_config()  # noqa: F821 (defined by IPython when it loads this file)
c.IPKernelApp.logging_config = {
    "filters": {"local_tcp_notice": {"()": _DropLocalTcpNotice}},
    "handlers": {"console": {"filters": ["local_tcp_notice"]}},
}
