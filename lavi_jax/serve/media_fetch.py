"""Where a request's images may come from: ``data:`` URLs, local files under a root, allowed web domains.

    fetcher = MediaFetcher(allowed_root="/data/images", allowed_domains=("images.example.com",))
    item = fetcher.item("image", url)   # -> (media.BASE64, text) | (media.IMAGE, path) | (media.VIDEO, path)

* ``data:<type>;base64,<payload>``: decoded (strictly: broken base64 is refused).
* a local path or ``file://`` URL: only with ``allowed_root``, and only inside it once symlinks are resolved.
* ``http(s)://``: only for a host in ``allowed_domains`` (a domain allows its subdomains), fetched only
  when every address the host resolves to is public: private, loopback, link-local (a cloud VM's
  metadata server), multicast and reserved addresses are refused. Redirects are followed by hand, each
  hop checked the same way; at most ``max_bytes`` are read.

Anything else raises :class:`MediaError`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from lavi_jax.data.media import BASE64, IMAGE, VIDEO

MAX_REDIRECTS = 3


class MediaError(ValueError):
    """A media URL the server will not read."""


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # every hop is checked by MediaFetcher


class MediaFetcher:
    def __init__(self, allowed_root: str | None = None, allowed_domains=(), *, max_bytes: int = 20 << 20,
                 timeout: float = 10.0, resolve=socket.getaddrinfo):
        self.allowed_root = os.path.realpath(allowed_root) if allowed_root else None
        self.allowed_domains = tuple(d.lower().strip(".") for d in allowed_domains if d)
        self.max_bytes, self.timeout, self._resolve = int(max_bytes), float(timeout), resolve

    def item(self, kind: str, url: str):
        """A media item ``media.MediaLoader`` reads, for an ``image`` or ``video`` part's url."""
        if url.startswith("data:"):
            return self._data(kind, url)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            data = self.fetch(url)
            if kind == VIDEO:
                raise MediaError("videos are read from local files only")
            return BASE64, base64.b64encode(data).decode("ascii")
        if scheme in ("", "file"):
            path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
            return (VIDEO if kind == VIDEO else IMAGE), self.local(path)
        raise MediaError(f"unsupported media URL scheme {scheme!r}")

    def _data(self, kind: str, url: str):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise MediaError("a data: URL must be base64 (data:<type>;base64,<payload>)")
        if kind == VIDEO:
            raise MediaError("videos are read from local files only")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError("the data: URL's payload is not valid base64") from None
        if len(raw) > self.max_bytes:
            raise MediaError(f"the image is {len(raw)} bytes, more than {self.max_bytes}")
        return BASE64, base64.b64encode(raw).decode("ascii")

    def local(self, path: str) -> str:
        if not self.allowed_root:
            raise MediaError("local media paths are disabled (start the server with --allowed-media-root)")
        real = os.path.realpath(path)
        if os.path.commonpath([real, self.allowed_root]) != self.allowed_root:
            raise MediaError(f"media path {path!r} is outside the allowed media root")
        if not os.path.isfile(real):
            raise MediaError(f"no media file at {path!r}")
        return real

    def check_url(self, url: str) -> None:
        """Raises MediaError unless ``url`` is http(s) on an allowed domain whose every address is public."""
        parts = urllib.parse.urlsplit(url)
        host = (parts.hostname or "").lower().strip(".")
        if parts.scheme.lower() not in ("http", "https") or not host:
            raise MediaError(f"unsupported media URL {url[:100]!r}")
        if not any(host == d or host.endswith("." + d) for d in self.allowed_domains):
            raise MediaError(f"fetching media from {host!r} is not allowed (see --allowed-media-domains)")
        try:
            infos = self._resolve(host, parts.port or (443 if parts.scheme == "https" else 80),
                                  type=socket.SOCK_STREAM)
        except OSError as e:
            raise MediaError(f"cannot resolve {host!r}: {e}") from None
        if not infos or not all(public_address(info[4][0]) for info in infos):
            raise MediaError(f"{host!r} resolves to a private, loopback or link-local address")

    def fetch(self, url: str) -> bytes:
        opener = urllib.request.build_opener(_NoRedirect)
        for _ in range(MAX_REDIRECTS + 1):
            self.check_url(url)
            try:
                with opener.open(url, timeout=self.timeout) as r:
                    data = r.read(self.max_bytes + 1)
            except urllib.error.HTTPError as e:
                if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                    url = urllib.parse.urljoin(url, e.headers["Location"])
                    continue
                raise MediaError(f"fetching the image failed: HTTP {e.code}") from None
            except OSError as e:
                raise MediaError(f"fetching the image failed: {e}") from None
            if len(data) > self.max_bytes:
                raise MediaError(f"the image is more than {self.max_bytes} bytes")
            return data
        raise MediaError(f"more than {MAX_REDIRECTS} redirects")
