"""The load generator's option types: the argparse ``type=`` checks of its command line.

Owns ``positive`` and ``nonnegative`` (a number that must be > 0, or >= 0, where 0
turns something off) and ``loopback_target`` (``--connect HOST:PORT``, loopback only).
They are the bench's own, not the server's: bench/ imports the wire and crypto layers
(framing, protocol, pg3lib, ...), never chatserver.py.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket


def positive(kind):
    """An argparse type: kind(text), refused unless above zero."""
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value
    return parse


def nonnegative(kind):
    """An argparse type: kind(text), refused if negative (0 turns a limit off)."""
    def parse(text: str):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text} is negative")
        return value
    return parse


def loopback_target(text: str) -> tuple:
    """``HOST:PORT`` of a running server -> (family, sockaddr, text); loopback addresses only."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise argparse.ArgumentTypeError(f"cannot resolve {host!r}: {exc}") from None
    for family, _type, _proto, _name, sockaddr in infos:
        if ipaddress.ip_address(sockaddr[0]).is_loopback:
            return family, sockaddr, text
    raise argparse.ArgumentTypeError(f"{text}: the load generator targets loopback addresses only")
