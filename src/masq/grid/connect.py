"""Reaching a Ray cluster without hanging: ``ray.init(address=...)`` takes no timeout and
retries an unreachable address for many minutes, so :func:`connect_ray` first probes
HOST:PORT over TCP and then gives ``ray.init`` a bounded time in a daemon thread; either
failure is a one-line ConfigError naming the address and ``--ray-timeout``.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Any

from masq.errors import ConfigError
from masq.fileio import error_text
from masq.plugins import ENV as PLUGINS_ENV
from masq.runtime import COMPILE_ENV

# Seconds to reach a Ray cluster given by --address before giving up (--ray-timeout): long
# enough for a cluster across a slow network, short enough that a wrong address is an error
# within a minute instead of a silent hang (ray.init itself retries for many minutes).
RAY_TIMEOUT = 30.0


def ray_endpoint(address: str | None) -> tuple[str, int] | None:
    """(host, port) of a Ray ``address`` "HOST:PORT" or "ray://HOST:PORT"; None where there
    is nothing to probe (no address: a local Ray is started; "auto"/"local": Ray finds it)."""
    if address is None or address in ("auto", "local"):
        return None
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(
            f"--address {address!r}: give auto or the cluster's HOST:PORT, e.g. 10.0.0.5:6379"
        )
    return host.strip("[]"), int(port)


def probe(address: str, endpoint: tuple[str, int], timeout: float) -> None:
    """A one-line ConfigError unless a TCP connection to ``endpoint`` opens within
    ``timeout`` seconds (refused, unreachable or silent: named, with the fix)."""
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else error_text(err)
        raise ConfigError(
            f"--address {address}: cannot reach a Ray cluster there within {timeout:g} s "
            f"({why}); start one (ray start --head) or fix the address; --ray-timeout sets "
            "the wait"
        ) from None


def connect_ray(ray: Any, address: str | None, timeout: float) -> None:
    """``ray.init`` at ``address``, given ``timeout`` seconds when an address is named: first
    a TCP probe of HOST:PORT (:func:`probe`), then ``ray.init`` in a daemon thread (it takes no
    timeout of its own and retries for minutes). A one-line ConfigError when it does not
    connect in time or fails; without an address a local Ray is started as before."""
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    # masq --plugin and --compile-step: the workers import the same modules, take the same step
    passed = {k: os.environ[k] for k in (PLUGINS_ENV, COMPILE_ENV) if os.environ.get(k)}
    if passed:
        kwargs["runtime_env"] = {"env_vars": passed}
    if address is None:
        ray.init(**kwargs)
        return
    endpoint = ray_endpoint(address)
    if endpoint is not None:
        probe(address, endpoint, timeout)
    failure: list[BaseException] = []

    def init() -> None:
        try:
            ray.init(address=address, **kwargs)
        except BaseException as err:  # reported by the caller's thread
            failure.append(err)

    thread = threading.Thread(target=init, name="masq-ray-connect", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ConfigError(
            f"--address {address}: the Ray cluster did not answer within {timeout:g} s; check "
            "that it is a Ray head node (ray status) or raise --ray-timeout"
        )
    if failure:
        first = (str(failure[0]).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"--address {address}: Ray could not connect ({type(failure[0]).__name__}: "
            f"{first}); check the address (ray status on the head node)"
        )


__all__ = ["RAY_TIMEOUT", "connect_ray", "probe", "ray_endpoint"]
