"""Streamed, length-checked, atomic downloads of result images.

The image is never held whole in memory: it goes chunk by chunk to `<name>.<random>.part`
(a compressed body inflated in bounded pieces), its length is checked against
`Content-Length` (without one, the image must end as its format says), and it is renamed
into place only when complete. A body larger than the cap, or whose first bytes are not a
PNG, JPEG or WebP image, is refused as it arrives (storage may label anything
`application/octet-stream`). The delivery host needs no key, and none is sent there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import glob
import logging
import os
import re
import secrets
import tempfile
import time
import zlib
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import IO, BinaryIO

import anyio
import httpx

from ._errors import (
    DownloadError,
    DownloadRefusedError,
    OutputExistsError,
    ParameterError,
    Problem,
    ResultExpiredError,
)
from ._http import parse_retry_after, retry_delay
from ._models import Result

__all__ = [
    "DEFAULT_MAX_BYTES",
    "IMAGE_SUFFIXES",
    "Downloader",
    "check_file_name",
    "check_output_dir",
    "image_suffix",
    "parts_of",
    "saved_as",
]

logger = logging.getLogger("bfl_async")

IMAGE_SUFFIXES = (".png", ".jpg", ".webp")
DEFAULT_MAX_BYTES = 64 << 20
_PEEK = 12
_PART_BYTES = 4  # random bytes in a part file's name, as hex digits
_PART = re.compile(rf"\.[0-9a-f]{{{2 * _PART_BYTES}}}\.part")
_TAIL = 32  # enough to find an image's end marker (PNG's IEND, JPEG's EOI)
_WRITE_BLOCK = 64 * 1024
_WINDOWS = os.name == "nt"
_WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$"]
    + [f"{port}{n}" for port in ("COM", "LPT") for n in "0123456789\u00b9\u00b2\u00b3"]
)
_DISK_THREADS = 4  # each worker thread holds memory; 24 downloads need few to write


def image_suffix(head: bytes) -> str | None:
    """The file suffix for an image's first bytes (PNG, JPEG or WebP), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    return None


def url_expiry(url: str) -> float | None:
    """The expiry of a signed URL as a Unix time, or None if it shows none: Azure SAS `se=`
    (ISO 8601 or epoch seconds), S3 and GCS V4 (`X-Amz-Date` / `X-Goog-Date` plus
    `-Expires` seconds), or a V2 or CloudFront `Expires=` (epoch seconds)."""
    params = {key.lower(): value for key, value in httpx.URL(url).params.multi_items()}
    if se := params.get("se"):
        seconds = _epoch(se)
        return seconds if seconds is not None else _iso_time(se)
    for vendor in ("x-amz", "x-goog"):
        signed, lasts = params.get(f"{vendor}-date"), params.get(f"{vendor}-expires")
        if signed and lasts and lasts.isdigit():
            try:
                when = dt.datetime.strptime(signed, "%Y%m%dT%H%M%SZ")
            except ValueError:
                return None
            return _epoch(when.replace(tzinfo=dt.timezone.utc).timestamp() + int(lasts))
    if expires := params.get("expires"):
        return _epoch(expires)
    return None


def _epoch(value: str | float) -> float | None:
    """Epoch seconds a date can be made of (not NaN, infinite or past year 9999), or None."""
    try:
        seconds = float(value)
        dt.datetime.fromtimestamp(seconds, dt.timezone.utc)
    except (ValueError, OverflowError, OSError):
        return None
    return seconds


def _iso_time(value: str) -> float | None:
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def saved_as(directory: Path, name: str) -> list[Path]:
    """The images already saved as `name` in `directory`, whatever their suffix."""
    return [path for suffix in IMAGE_SUFFIXES if (path := directory / f"{name}{suffix}").exists()]


def _part_of(directory: Path, name: str) -> Path:
    """A file of its own for one download of `name`: two downloads to one name (gathered,
    last one wins) must not write into each other's file."""
    return directory / f"{name}.{secrets.token_hex(_PART_BYTES)}.part"


def parts_of(directory: Path, name: str) -> list[Path]:
    """The part files downloads of `name` left in `directory` (`_part_of`'s names)."""
    found = directory.glob(f"{glob.escape(name)}.*.part")
    return [path for path in found if _PART.fullmatch(path.name[len(name) :])]


def check_file_name(model: str, name: str) -> None:
    """Refuse a file name that could leave its directory or confuse a file system.

    Its length is counted in bytes, as file systems count it (at most 255 a name), with room
    for `<name>.<random>.part`: 200 CJK characters are 600 bytes.
    """
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:  # a lone surrogate: no file can be named with it
        size = None
    if (
        name in ("", ".", "..")
        or Path(name).name != name
        or "\\" in name
        or size is None
        or size > 200
        or any(ord(c) < 32 or ord(c) == 127 for c in name)
        or (_WINDOWS and _windows_refuses(name))
    ):
        allowed = "a name without / or \\, of at most 200 bytes"
        if _WINDOWS:
            allowed += ', without <>:"|?* and not a device name such as CON or NUL'
        raise ParameterError(
            model, [Problem("name", f"{name!r} is not a plain file name", allowed)]
        )


def _windows_refuses(name: str) -> bool:
    """Whether Windows would make something else of the file: `a:b.png` is a hidden stream
    of `a`, `CON.png` the console."""
    return any(c in '<>:"|?*' for c in name) or (
        name.split(".")[0].rstrip(" ").upper() in _WINDOWS_DEVICES
    )


def check_output_dir(model: str, directory: Path) -> None:
    """Refuse, before anything is paid, a directory no image could be saved in (a file, a
    read-only mount): create it if needed, and a file in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".bfl-write-check-"):
            pass
    except OSError as exc:
        raise ParameterError(
            model,
            [
                Problem(
                    "output_dir",
                    f"{str(directory)!r} cannot take files ({exc.strerror or exc})",
                    "a directory that can be written to",
                )
            ],
        ) from None


class _Broken(Exception):
    """One transfer attempt failed in a way a new attempt may fix."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after  # what the delivery host asked for (429, 503)


class Downloader:
    """Fetches result images from delivery hosts, retrying truncated transfers."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        *,
        attempts: int = 3,
        max_bytes: int | None = DEFAULT_MAX_BYTES,
        retry_base_delay: float = 0.5,
    ) -> None:
        self._client = client
        self._attempts = attempts
        self._retry_base = retry_base_delay
        self._max_bytes = max_bytes
        self._disk: anyio.CapacityLimiter | None = None

    async def _write(
        self,
        part: Path,
        file: IO[bytes] | None,
        data: bytearray,
        *,
        last: bool,
        durable: bool = False,
    ) -> IO[bytes] | None:
        """Write `data` to `part` in a worker thread; returns the open file, or None once
        `last` closed it."""
        if self._disk is None:  # made on first use: a limiter belongs to a running loop
            self._disk = anyio.CapacityLimiter(_DISK_THREADS)
        return await anyio.to_thread.run_sync(
            _write_block, part, file, data, last, durable, limiter=self._disk
        )

    def _refuse(self, result: Result, why: str) -> DownloadRefusedError:
        return DownloadRefusedError(
            f"the result of task {result.task.id} was refused: {why}; nothing was saved. "
            "Download e.result again with client.download() while its URL is valid",
            task=result.task,
            result=result,
        )

    def _check_size(self, result: Result, size: int) -> None:
        if self._max_bytes is not None and size > self._max_bytes:
            raise self._refuse(
                result, f"it is larger than max_download_bytes ({self._max_bytes} bytes)"
            )

    def _check_image(self, result: Result, head: bytes) -> None:
        if image_suffix(head) is None:
            raise self._refuse(result, "it is not a PNG, JPEG or WebP image")

    def _refused(self, result: Result, status: int) -> Exception:
        """What a delivery host's refusal (401, 403, 404, 410) of the result URL means: a URL
        past its expiry is gone; one refused before it is tried again (a blob not yet
        replicated, a host astray). The URL is always tried first: only the host knows
        whether it expired, and a clock ten minutes fast would otherwise lose every image."""
        expiry = url_expiry(result.sample)
        if expiry is not None and expiry <= time.time():
            return ResultExpiredError(
                f"the result URL of task {result.task.id} expired at "
                f"{dt.datetime.fromtimestamp(expiry, dt.timezone.utc):%H:%M:%S} UTC "
                f"(refused with {status}); BFL keeps results about 10 minutes. Generate the "
                "image again",
                task=result.task,
            )
        if expiry is not None:
            # Tried again, and on failure the paid result is kept to be fetched again
            # while it is valid.
            return _Broken(f"HTTP {status} before the URL's expiry")
        return ResultExpiredError(
            f"the delivery host refused the result URL of task {result.task.id} ({status}); "
            "it has probably expired. Generate the image again",
            task=result.task,
        )

    async def chunks(self, result: Result) -> AsyncGenerator[bytes, None]:
        """One streamed GET of the image, checked at the end for its length, or without a
        `Content-Length` for the image's own end (a close can end such a body early)."""
        try:
            request = self._client.build_request(
                "GET", result.sample, headers={"accept-encoding": "identity"}
            )
        except httpx.InvalidURL as exc:
            raise DownloadError(
                f"the result URL of task {result.task.id} does not parse ({exc}), so its image "
                "cannot be fetched from it; wait for the task again for a new URL, or report "
                "its id to BFL",
                task=result.task,
                result=result,
            ) from None
        try:
            response = await self._client.send(request, stream=True, follow_redirects=True)
        except httpx.HTTPError as exc:  # lost, or undecodable
            raise _Broken(type(exc).__name__) from exc
        try:
            if response.status_code in (401, 403, 404, 410):
                raise self._refused(result, response.status_code)
            if response.status_code != 200:
                wait = parse_retry_after(response.headers.get("retry-after"))
                raise _Broken(f"HTTP {response.status_code}", wait)
            declared = response.headers.get("content-length")
            expected = int(declared) if declared is not None and declared.isdigit() else None
            if expected is not None:
                self._check_size(result, expected)
            encoding = response.headers.get("content-encoding", "").strip().lower()
            # Read into memory and decoded by its transport (httpx.MockTransport's answers).
            preread = response.is_stream_consumed
            if preread and encoding:
                encoding, expected = "", None  # the raw length is gone with the raw bytes
            inflate = _Inflate.for_encoding(encoding)
            if inflate is None:
                raise self._refuse(result, f"it came compressed as {encoding!r}")
            head = b""  # the first bytes, held back until they show it is an image
            tail = b""
            size = 0
            try:
                async with contextlib.aclosing(_body(response, inflate, preread)) as body:
                    async for chunk in body:
                        size += len(chunk)
                        self._check_size(result, size)
                        tail = (tail + chunk[-_TAIL:])[-_TAIL:]
                        if len(head) < _PEEK:
                            head += chunk
                            if len(head) < _PEEK:
                                continue
                            self._check_image(result, head)
                            chunk = head
                            head = head[:_PEEK]
                        yield chunk
            except (httpx.HTTPError, zlib.error) as exc:  # lost, or undecodable
                what = "DecodingError" if isinstance(exc, zlib.error) else type(exc).__name__
                raise _Broken(f"{what} after {response.num_bytes_downloaded} bytes") from exc
            # Counted on the raw bytes: a compressed body is inflated here.
            got = len(response.content) if preread else response.num_bytes_downloaded
            if expected is not None and got != expected:
                raise _Broken(f"truncated: got {got} of {expected} bytes")
            if len(head) < _PEEK:
                self._check_image(result, head)
                yield head
            if expected is None and not _ends_whole(head, tail, size):
                # No length to check: a connection closed early ends such a body as
                # cleanly as the server would, so the image must show its own end.
                raise _Broken(f"truncated: the body ended after {size} bytes, mid-image")
        finally:
            await response.aclose()

    async def _pause(self, result: Result, exc: _Broken, attempt: int) -> None:
        """Wait before the next attempt: a backoff, or as long as the host asked, but never
        past the URL's expiry (the next attempt would then only learn that it expired)."""
        delay = retry_delay(self._retry_base, attempt, exc.retry_after)
        expiry = url_expiry(result.sample)
        if expiry is not None:
            delay = min(delay, max(0.0, expiry - time.time()))
        logger.info("download of task %s broke (%s); retrying in %.1fs", result.task.id, exc, delay)
        await anyio.sleep(delay)

    def _failed(self, result: Result, exc: _Broken, attempts: int) -> DownloadError:
        return DownloadError(
            f"downloading the image of task {result.task.id} failed after "
            f"{attempts} attempt{'s' if attempts > 1 else ''} ({exc}); download e.result "
            "again with client.download() while its URL is valid",
            task=result.task,
            result=result,
        )

    async def stream(self, result: Result) -> AsyncGenerator[bytes, None]:
        """Yield the image's bytes; a transfer broken before the first byte went out is
        tried again, one broken after it raises (those bytes cannot be taken back)."""
        for attempt in range(1, self._attempts + 1):
            sent = False
            try:
                async with contextlib.aclosing(self.chunks(result)) as chunks:
                    async for chunk in chunks:
                        sent = True
                        yield chunk
                return
            except _Broken as exc:
                if sent:
                    raise DownloadError(
                        f"the image of task {result.task.id} arrived incomplete ({exc}); "
                        "stream it again while its URL is valid",
                        task=result.task,
                        result=result,
                    ) from None
                if attempt == self._attempts:
                    raise self._failed(result, exc, attempt) from None
                await self._pause(result, exc, attempt)

    async def to_file(self, result: Result, file: BinaryIO) -> int:
        """Write the image into a binary file object; return the number of bytes. A file
        that can seek is left as it was found unless the whole image is written."""
        start = file.tell() if file.seekable() else None
        for attempt in range(1, self._attempts + 1):
            written = 0
            try:
                async with contextlib.aclosing(self.chunks(result)) as chunks:
                    async for chunk in chunks:
                        file.write(chunk)
                        written += len(chunk)
                return written
            except _Broken as exc:
                # Bytes written to a file that cannot be rewound cannot be taken back.
                if (start is None and written) or attempt == self._attempts:
                    _rewind(file, start)
                    raise self._failed(result, exc, attempt) from None
                _rewind(file, start)
                await self._pause(result, exc, attempt)
            except BaseException:  # refused past the cap, cancelled: no part of an image
                if written:
                    with contextlib.suppress(OSError):
                        _rewind(file, start)
                raise
        raise AssertionError("unreachable")

    async def to_directory(
        self, result: Result, directory: Path, name: str, *, overwrite: bool, durable: bool = False
    ) -> Path:
        """Save the image as `<directory>/<name><suffix>`, suffix from its magic bytes.

        `durable` (a batch's downloads) syncs the file and then its directory to disk before
        returning, so a journal that then says `downloaded` survives a power cut.
        """
        path = await self._place(result, directory, name, overwrite=overwrite, durable=durable)
        if durable:
            await anyio.to_thread.run_sync(_sync_directory, directory)
        return path

    async def _place(
        self, result: Result, directory: Path, name: str, *, overwrite: bool, durable: bool
    ) -> Path:
        part = _part_of(directory, name)
        for attempt in range(1, self._attempts + 1):
            head = b""
            # Written in blocks, each in one trip to a worker thread (the first one opens
            # the file, the last one closes it), on a few threads shared by all downloads.
            block = bytearray()
            file: IO[bytes] | None = None
            try:
                async with contextlib.aclosing(self.chunks(result)) as chunks:
                    async for chunk in chunks:
                        if len(head) < _PEEK:
                            head += chunk[: _PEEK - len(head)]
                        block += chunk
                        if len(block) >= _WRITE_BLOCK:
                            file = await self._write(part, file, block, last=False)
                            block.clear()
                    file = await self._write(part, file, block, last=True, durable=durable)
                break
            except _Broken as exc:
                _discard(file, part)
                if attempt == self._attempts:
                    raise self._failed(result, exc, attempt) from None
                await self._pause(result, exc, attempt)
            except BaseException:
                _discard(file, part)
                raise
        suffix = image_suffix(head)
        assert suffix is not None  # chunks() refuses anything else
        target = directory / f"{name}{suffix}"
        try:
            _move(part, target, overwrite=overwrite)
        except OutputExistsError:  # the paid image is kept as `part`, and the error says so
            raise
        except OSError:  # a directory in the way, no permission: no stray part file
            _discard(None, part)
            raise
        return target


def _move(part: Path, target: Path, *, overwrite: bool) -> None:
    """Put the complete `part` at `target`, atomically; without `overwrite`, never over a
    file that is there."""
    if overwrite:
        os.replace(part, target)
        return
    try:
        os.link(part, target)
    except FileExistsError:
        raise OutputExistsError(str(target), kept=str(part)) from None
    except OSError:
        # No hard links on this filesystem: check, then rename.
        if target.exists():
            raise OutputExistsError(str(target), kept=str(part)) from None
        os.replace(part, target)
        return
    with contextlib.suppress(OSError):  # the image is in place; a second name is harmless
        part.unlink()


class _Inflate:
    """A body's `Content-Encoding` undone in pieces of at most `_WRITE_BLOCK` bytes: 64 KB
    of gzip can inflate to 64 MB, which the cap must stop before it is in memory."""

    def __init__(self, wbits: int | None) -> None:
        self._wbits = wbits  # None: identity
        self._inflater = zlib.decompressobj(wbits) if wbits is not None else None
        self._fresh = True

    @classmethod
    def for_encoding(cls, encoding: str) -> _Inflate | None:
        """The decoder for a `Content-Encoding` header, or None for a compression it does
        not undo (brotli, zstd, several layers). Unknown tokens pass through, as httpx's."""
        if encoding in ("gzip", "x-gzip"):
            return cls(zlib.MAX_WBITS | 16)
        if encoding == "deflate":
            return cls(zlib.MAX_WBITS)
        if encoding in ("br", "zstd", "compress", "x-compress") or "," in encoding:
            return None
        return cls(None)

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self._inflater is None:
            if data:
                yield data
            return
        if self._fresh and data and self._wbits == zlib.MAX_WBITS:
            self._fresh = False
            try:  # "deflate" is zlib-wrapped, but some servers send it raw
                zlib.decompressobj(zlib.MAX_WBITS).decompress(data[:2])
            except zlib.error:
                self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        while data:
            piece = self._inflater.decompress(data, _WRITE_BLOCK)
            data = self._inflater.unconsumed_tail
            if piece:
                yield piece

    def finish(self) -> Iterator[bytes]:
        """What the inflater still holds; a stream that did not reach its end is broken."""
        if self._inflater is None:
            return
        while piece := self._inflater.decompress(b"", _WRITE_BLOCK):
            yield piece
        if not self._inflater.eof:
            raise zlib.error("the compressed body ended early")


async def _body(
    response: httpx.Response, inflate: _Inflate, preread: bool
) -> AsyncGenerator[bytes, None]:
    """The body's bytes, inflated in bounded pieces if it came compressed."""
    async for raw in response.aiter_bytes() if preread else response.aiter_raw():
        for piece in inflate.feed(raw):
            yield piece
    for piece in inflate.finish():
        yield piece


_PNG_END = b"IEND\xaeB`\x82"
_JPEG_END = b"\xff\xd9"


def _ends_whole(head: bytes, tail: bytes, size: int) -> bool:
    """Whether an image of `size` bytes, starting with `head` and ending with `tail`, ends
    where its format says: PNG's IEND chunk, JPEG's end-of-image marker, WebP's RIFF size."""
    suffix = image_suffix(head)
    if suffix == ".png":
        return _PNG_END in tail
    if suffix == ".jpg":
        return _JPEG_END in tail  # in entropy-coded data 0xFF is followed by 0x00 or RSTn
    return size >= int.from_bytes(head[4:8], "little") + 8


def _write_block(
    part: Path, file: IO[bytes] | None, data: bytearray, last: bool, durable: bool
) -> IO[bytes] | None:
    if file is None:
        part.parent.mkdir(parents=True, exist_ok=True)
        file = part.open("wb")
    try:
        file.write(data)
        if not last:
            return file
        if durable:  # the bytes are on disk before the file is placed
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        file.close()  # the caller never gets it back to close (a full disk, say)
        raise
    file.close()
    return None


def _rewind(file: BinaryIO, start: int | None) -> None:
    """Take back what a failed attempt wrote to a file object, if it can seek."""
    if start is not None:
        file.seek(start)
        file.truncate()


def _discard(file: IO[bytes] | None, part: Path) -> None:
    """Drop a part file after a failed attempt."""
    if file is not None:
        file.close()
    with contextlib.suppress(OSError):
        part.unlink()


def _sync_directory(directory: Path) -> None:
    """Make a rename or link in `directory` durable (POSIX; Windows has no directory fsync)."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
