"""Streamed, length-checked, atomic downloads of result images.

The image is never held whole in memory: it goes chunk by chunk to `<name>.<random>.part`,
its length is checked against `Content-Length`, and it is renamed into place only when
complete. A body larger than the cap, or whose first bytes are not a PNG, JPEG or WebP
image, is refused as it arrives (storage may label anything `application/octet-stream`).
The delivery host needs no key, and none is sent there.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import secrets
import tempfile
import time
from collections.abc import AsyncGenerator
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
    "saved_as",
]

logger = logging.getLogger("bfl_async")

IMAGE_SUFFIXES = (".png", ".jpg", ".webp")
DEFAULT_MAX_BYTES = 64 << 20
_PEEK = 12
_WRITE_BLOCK = 64 * 1024
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
    """The `se=` expiry of a signed URL as a Unix time (epoch seconds or ISO 8601)."""
    value = httpx.URL(url).params.get("se")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
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
    ):
        raise ParameterError(
            model,
            [
                Problem(
                    "name",
                    f"{name!r} is not a plain file name",
                    "a name without / or \\, of at most 200 bytes",
                )
            ],
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

    def _check_fresh(self, result: Result) -> None:
        expiry = url_expiry(result.sample)
        if expiry is not None and expiry <= time.time():
            raise ResultExpiredError(
                f"the result URL of task {result.task.id} expired at "
                f"{dt.datetime.fromtimestamp(expiry, dt.timezone.utc):%H:%M:%S} UTC; "
                "BFL keeps results about 10 minutes. Generate the image again",
                task=result.task,
            )

    async def chunks(self, result: Result) -> AsyncGenerator[bytes, None]:
        """One streamed GET of the image, checked for length at the end."""
        self._check_fresh(result)
        request = self._client.build_request(
            "GET", result.sample, headers={"accept-encoding": "identity"}
        )
        try:
            response = await self._client.send(request, stream=True, follow_redirects=True)
        except httpx.HTTPError as exc:  # lost, or undecodable
            raise _Broken(type(exc).__name__) from exc
        try:
            if response.status_code in (401, 403, 404, 410):
                self._check_fresh(result)
                if url_expiry(result.sample) is not None:
                    # Refused before the expiry it was signed with: a blob not yet
                    # replicated, a clock or a host astray. Tried again, and on failure
                    # the paid result is kept to be fetched again while it is valid.
                    raise _Broken(f"HTTP {response.status_code} before the URL's expiry")
                raise ResultExpiredError(
                    f"the delivery host refused the result URL of task {result.task.id} "
                    f"({response.status_code}); it has probably expired. Generate the "
                    "image again",
                    task=result.task,
                )
            if response.status_code != 200:
                wait = parse_retry_after(response.headers.get("retry-after"))
                raise _Broken(f"HTTP {response.status_code}", wait)
            expected = response.headers.get("content-length")
            if expected is not None and expected.isdigit():
                self._check_size(result, int(expected))
            pending = b""  # held back until the first bytes show it is an image
            checked = False
            size = 0
            try:
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    self._check_size(result, size)
                    if not checked:
                        pending += chunk
                        if len(pending) < _PEEK:
                            continue
                        self._check_image(result, pending)
                        checked = True
                        chunk, pending = pending, b""
                    yield chunk
            except httpx.HTTPError as exc:  # lost, or undecodable
                raise _Broken(
                    f"{type(exc).__name__} after {response.num_bytes_downloaded} bytes"
                ) from exc
            # Counted on the raw bytes: httpx decodes compressed bodies.
            got = response.num_bytes_downloaded
            if expected is not None and expected.isdigit() and got != int(expected):
                raise _Broken(f"truncated: got {got} of {expected} bytes")
            if not checked:
                self._check_image(result, pending)
                yield pending
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
        """Write the image into a binary file object; return the number of bytes."""
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
                    raise self._failed(result, exc, attempt) from None
                if start is not None:
                    file.seek(start)
                    file.truncate()
                await self._pause(result, exc, attempt)
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
        # A name of its own: two downloads to one name (gathered, last one wins) must not
        # write into each other's file.
        part = directory / f"{name}.{secrets.token_hex(4)}.part"
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
        if overwrite:
            os.replace(part, target)
        else:
            try:
                os.link(part, target)
            except FileExistsError:
                raise OutputExistsError(str(target), kept=str(part)) from None
            except OSError:
                # No hard links on this filesystem: check, then rename.
                if target.exists():
                    raise OutputExistsError(str(target), kept=str(part)) from None
                os.replace(part, target)
                return target
            part.unlink()
        return target


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
