"""Downloads: expiry parsing, retries, broken streams, file objects, atomic placement."""

from __future__ import annotations

import io
import os
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import respx

from bfl_async import (
    DownloadError,
    DownloadRefusedError,
    OutputExistsError,
    ParameterError,
    Result,
    ResultExpiredError,
    Task,
)
from bfl_async._download import (
    Downloader,
    _write_block,
    check_file_name,
    image_suffix,
    url_expiry,
)
from bfl_async.testing._images import render

from .helpers import DELIVERY, PNG, image, signed_url

pytestmark = pytest.mark.anyio

# Real images, whose ends a body without a Content-Length is checked for.
WHOLE_PNG = b"".join(render("png", "t1", (8, 8)))
WHOLE_JPEG = b"".join(render("jpeg", "t1", (8, 8)))
WHOLE_WEBP = b"".join(render("webp", "t1", (8, 8)))


def result_for(url: str) -> Result:
    task = Task(id="t1", polling_url="https://api.eu2.bfl.ai/v1/get_result?id=t1", model="m")
    return Result(task=task, sample=url, ready_at=time.time())


@pytest.fixture
def mock() -> AsyncIterator[respx.MockRouter]:
    with respx.mock(assert_all_mocked=True) as router:
        yield router


@pytest.fixture
async def downloader() -> AsyncIterator[Downloader]:
    async with httpx.AsyncClient() as client:
        yield Downloader(client, attempts=3, retry_base_delay=0.001)


class _BreaksAfterFirstChunk(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield PNG[:50]
        raise httpx.ReadError("connection reset")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://d.example/x?se=1700000000&sig=1", 1700000000.0),
        ("https://d.example/x?se=2024-01-01T00:00:00Z&sp=r", 1704067200.0),
        ("https://d.example/x?se=2024-01-01T00:00:00&sp=r", 1704067200.0),
        ("https://d.example/x?sig=1", None),
        ("https://d.example/x?se=soon", None),
        ("https://d.example/x?se=nan", None),  # not a time: datetime raised for the message
        ("https://d.example/x?se=-1e300", None),
        (
            "https://s3.example/x?X-Amz-Date=20240101T000000Z&X-Amz-Expires=600&X-Amz-Signature=1",
            1704067800.0,
        ),
        ("https://gcs.example/x?X-Goog-Date=20240101T000000Z&X-Goog-Expires=3600", 1704070800.0),
        ("https://s3.example/x?Expires=1700000000&Signature=1", 1700000000.0),
        ("https://s3.example/x?X-Amz-Date=yesterday&X-Amz-Expires=600", None),
    ],
)
def test_url_expiry(url: str, expected: float | None) -> None:
    assert url_expiry(url) == expected


def test_image_suffix_needs_known_magic() -> None:
    assert image_suffix(b"GIF89a") is None
    assert image_suffix(b"RIFF\0\0\0\0WAVE") is None


async def test_server_errors_on_delivery_are_retried(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    route = mock.get(DELIVERY).mock(
        side_effect=[httpx.Response(500), httpx.ConnectError("x"), image()]
    )
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == PNG and route.call_count == 3


async def test_a_stream_broken_midway_is_retried(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    broken = httpx.Response(200, stream=_BreaksAfterFirstChunk())
    mock.get(DELIVERY).mock(side_effect=[broken, image()])
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == PNG


@pytest.mark.parametrize("status", [401, 403, 404, 410])
async def test_a_refusal_before_the_urls_expiry_is_tried_again(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path, status: int
) -> None:
    # A blob not yet replicated, or a delivery host astray, is not an expired result.
    refused = httpx.Response(status, text="<Error><Code>AuthenticationFailed</Code></Error>")
    route = mock.get(DELIVERY).mock(side_effect=[refused, image()])
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == PNG and route.call_count == 2


async def test_a_refusal_that_lasts_keeps_the_paid_result_for_later(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    mock.get(DELIVERY).mock(return_value=httpx.Response(403))
    result = result_for(signed_url())
    with pytest.raises(DownloadError, match=r"3 attempts \(HTTP 403 before the URL's expiry") as e:
        await downloader.to_directory(result, tmp_path, "a", overwrite=False)
    assert not isinstance(e.value, ResultExpiredError) and e.value.result == result
    assert list(tmp_path.iterdir()) == []


async def test_a_refused_url_without_an_expiry_is_taken_as_expired(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    route = mock.get(DELIVERY).mock(return_value=httpx.Response(403))
    unsigned = result_for(f"{DELIVERY}?sig=1")
    with pytest.raises(ResultExpiredError, match=r"refused the result URL .* \(403\)"):
        await downloader.to_directory(unsigned, tmp_path, "a", overwrite=False)
    assert route.call_count == 1


class Pipe(io.RawIOBase):
    """A file object that cannot seek: what was written to it stays written."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.data += b
        return len(b)


async def test_an_unseekable_file_object_cannot_be_retried(
    mock: respx.MockRouter, downloader: Downloader
) -> None:
    short = httpx.Response(200, content=PNG[:100], headers={"content-length": str(len(PNG))})
    route = mock.get(DELIVERY).mock(side_effect=[short, image()])
    pipe = Pipe()
    with pytest.raises(DownloadError, match=r"after 1 attempt \(truncated"):
        await downloader.to_file(result_for(signed_url()), pipe)  # type: ignore[arg-type]
    assert route.call_count == 1 and pipe.data == PNG[:100]  # the bytes already went out


async def test_an_unseekable_file_object_is_retried_until_its_first_byte(
    mock: respx.MockRouter, downloader: Downloader
) -> None:
    busy = httpx.Response(503, headers={"Retry-After": "0"})
    route = mock.get(DELIVERY).mock(side_effect=[busy, httpx.ConnectError("x"), image()])
    pipe = Pipe()
    assert await downloader.to_file(result_for(signed_url()), pipe) == len(PNG)  # type: ignore[arg-type]
    assert pipe.data == PNG and route.call_count == 3


async def test_a_stream_is_retried_until_its_first_byte_goes_out(
    mock: respx.MockRouter, downloader: Downloader
) -> None:
    route = mock.get(DELIVERY).mock(
        side_effect=[httpx.Response(500), httpx.ConnectError("x"), image()]
    )
    chunks = [chunk async for chunk in downloader.stream(result_for(signed_url()))]
    assert b"".join(chunks) == PNG and route.call_count == 3
    # Once bytes went out, a new attempt would send them twice: the break is the caller's.
    mock.reset()
    route = mock.get(DELIVERY).mock(
        side_effect=[httpx.Response(200, stream=_BreaksAfterFirstChunk()), image()]
    )
    got = bytearray()
    with pytest.raises(DownloadError, match="incomplete"):
        async for chunk in downloader.stream(result_for(signed_url())):
            got += chunk
    assert got == PNG[:50] and route.call_count == 1


@pytest.mark.parametrize(
    "name", ["图" * 100, "é" * 130, "x\ud800"], ids=["cjk", "accents", "surrogate"]
)
def test_a_name_no_file_system_can_hold_is_refused_before_anything_is_paid(name: str) -> None:
    # At most 200 characters, but more bytes than a file name holds (255), or none at all
    # (a lone surrogate): the download, after the submit, would fail.
    with pytest.raises(ParameterError, match="not a plain file name"):
        check_file_name("m", name)


@pytest.mark.parametrize("name", ["a" * 200, "图" * 66], ids=["ascii", "cjk"])
async def test_the_longest_names_allowed_can_be_saved(
    name: str, mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    check_file_name("m", name)
    mock.get(DELIVERY).mock(return_value=image())
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, name, overwrite=False)
    assert path.name == f"{name}.png" and path.read_bytes() == PNG


async def test_without_hard_links_the_file_is_still_placed_atomically(
    mock: respx.MockRouter,
    downloader: Downloader,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_links(src: str, dst: str) -> None:
        raise PermissionError("this filesystem has no hard links")

    monkeypatch.setattr(os, "link", no_links)
    mock.get(DELIVERY).mock(return_value=image())
    result = result_for(signed_url())
    path = await downloader.to_directory(result, tmp_path, "a", overwrite=False)
    assert path.read_bytes() == PNG
    with pytest.raises(OutputExistsError) as caught:
        await downloader.to_directory(result, tmp_path, "a", overwrite=False)
    assert Path(caught.value.kept or "").read_bytes() == PNG


async def test_a_cancelled_download_leaves_no_part_file(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    class Slow(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield PNG[:50]
            await anyio.sleep(10)
            yield PNG[50:]

    mock.get(DELIVERY).mock(return_value=httpx.Response(200, stream=Slow()))
    with anyio.move_on_after(0.1):
        await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert list(tmp_path.iterdir()) == []


class _Chunks(httpx.AsyncByteStream):
    """A body sent in the given pieces, without a Content-Length."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = pieces
        self.sent = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for piece in self.pieces:
            self.sent += 1
            yield piece


async def test_a_body_larger_than_the_cap_is_refused_from_its_content_length(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    route = mock.get(DELIVERY).respond(200, content=PNG * 10)
    async with httpx.AsyncClient() as client:
        small = Downloader(client, max_bytes=len(PNG) * 5)
        with pytest.raises(DownloadRefusedError, match="larger than max_download_bytes") as e:
            await small.to_directory(result_for(signed_url()), tmp_path, "big", overwrite=False)
    assert e.value.task.id == "t1" and isinstance(e.value, DownloadError)
    assert route.call_count == 1  # refused, not retried
    assert list(tmp_path.iterdir()) == []


async def test_a_body_without_length_is_cut_off_at_the_cap(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    body = _Chunks(PNG, PNG, PNG, PNG, PNG)
    mock.get(DELIVERY).mock(return_value=httpx.Response(200, stream=body))
    async with httpx.AsyncClient() as client:
        small = Downloader(client, max_bytes=len(PNG) * 2)
        with pytest.raises(DownloadRefusedError):
            await small.to_directory(result_for(signed_url()), tmp_path, "big", overwrite=False)
    assert body.sent == 3 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("pieces", [[b"\x89PN", b"G\r\n\x1a\n", WHOLE_PNG[8:]], [PNG[:5]], [b""]])
async def test_the_first_bytes_decide_even_across_small_chunks(
    pieces: list[bytes], mock: respx.MockRouter, tmp_path: Path
) -> None:
    mock.get(DELIVERY).mock(return_value=httpx.Response(200, stream=_Chunks(*pieces)))
    async with httpx.AsyncClient() as client:
        downloader = Downloader(client, max_bytes=None)
        if b"".join(pieces) == WHOLE_PNG:
            path = await downloader.to_directory(
                result_for(signed_url()), tmp_path, "a", overwrite=False
            )
            assert path.read_bytes() == WHOLE_PNG and path.suffix == ".png"
        else:
            with pytest.raises(DownloadRefusedError, match="not a PNG, JPEG or WebP"):
                await downloader.to_directory(
                    result_for(signed_url()), tmp_path, "a", overwrite=False
                )
            assert list(tmp_path.iterdir()) == []


async def test_a_file_object_gets_no_bytes_of_a_non_image(mock: respx.MockRouter) -> None:
    mock.get(DELIVERY).respond(200, content=b"<html>" + b"x" * 100)
    async with httpx.AsyncClient() as client:
        out = io.BytesIO()
        with pytest.raises(DownloadRefusedError):
            await Downloader(client).to_file(result_for(signed_url()), out)
    assert out.getvalue() == b""


async def test_tls_is_verified_unless_turned_off() -> None:
    import ssl

    from bfl_async import AsyncBFL

    for verify, mode in ((True, ssl.CERT_REQUIRED), (False, ssl.CERT_NONE)):
        async with AsyncBFL(api_key="k", verify=verify) as client:
            transport = client._http._transport
            pool = transport._pool(httpx.URL("https://api.bfl.ai/v1/x"))  # type: ignore[attr-defined]
            assert pool._pool._ssl_context.verify_mode == mode


class _Garbled(httpx.AsyncByteStream):
    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"\x00 not gzip at all"


async def test_an_undecodable_body_is_a_broken_transfer_and_retried(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    garbled = httpx.Response(200, headers={"content-encoding": "gzip"}, stream=_Garbled())
    route = mock.get(DELIVERY).mock(side_effect=[garbled, image()])
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == PNG and route.call_count == 2


@pytest.mark.parametrize("durable", [False, True])
async def test_durable_downloads_sync_the_file_and_its_directory(
    durable: bool,
    mock: respx.MockRouter,
    downloader: Downloader,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    synced: list[tuple[str, bool]] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        name = os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else "?"
        synced.append((Path(name).name, (tmp_path / "a.png").exists()))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    mock.get(DELIVERY).mock(return_value=image())
    result = result_for(signed_url())
    path = await downloader.to_directory(result, tmp_path, "a", overwrite=False, durable=durable)
    assert path.read_bytes() == PNG
    if durable:  # the bytes before the file is placed, the directory after
        assert [placed for _, placed in synced] == [False, True]
        if os.path.exists("/proc/self/fd"):
            [(part, _), (directory, _)] = synced
            assert part.startswith("a.") and part.endswith(".part")
            assert directory == tmp_path.name
    else:
        assert synced == []


class _Trickle(httpx.AsyncByteStream):
    """An image arriving in small pieces, each after a pause: downloads overlap."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.data), 16 * 1024):
            await anyio.sleep(0.001)
            yield self.data[start : start + 16 * 1024]


@pytest.mark.parametrize("overwrite", [True, False])
async def test_two_downloads_to_one_name_never_mix(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path, overwrite: bool
) -> None:
    images = {tag: PNG[:8] + tag * (256 * 1024) for tag in (b"A", b"B")}
    for tag, data in images.items():
        mock.get(f"{DELIVERY}/{tag.decode()}").mock(
            return_value=httpx.Response(
                200, stream=_Trickle(data), headers={"content-length": str(len(data))}
            )
        )
    outcomes: list[Path | OutputExistsError] = []

    async def save(tag: str) -> None:
        result = result_for(signed_url(path=f"{DELIVERY}/{tag}"))
        try:
            outcomes.append(
                await downloader.to_directory(result, tmp_path, "hero", overwrite=overwrite)
            )
        except OutputExistsError as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(save, "A")
        tg.start_soon(save, "B")
    assert (tmp_path / "hero.png").read_bytes() in images.values()  # one whole image
    errors = [o for o in outcomes if isinstance(o, OutputExistsError)]
    if overwrite:
        assert not errors
    else:  # the other is paid for, and kept whole
        [error] = errors
        assert Path(error.kept or "").read_bytes() in images.values()


async def test_a_busy_delivery_host_is_given_the_time_it_asks_for(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path, planned_waits: list[float]
) -> None:
    waits = planned_waits
    busy = httpx.Response(503, headers={"Retry-After": "2"})
    mock.get(DELIVERY).mock(side_effect=[busy, httpx.Response(500), image()])
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == PNG
    assert 2.0 <= waits[0] <= 2.5 and 0.0 < waits[1] < 0.01  # as asked; then a short backoff
    # Never past the URL's expiry: the attempt after it could only learn that it expired.
    waits.clear()
    mock.get(DELIVERY).mock(
        side_effect=[httpx.Response(429, headers={"Retry-After": "900"}), image()]
    )
    await downloader.to_directory(result_for(signed_url(60)), tmp_path, "b", overwrite=False)
    assert 55 <= waits[0] <= 60


def test_a_block_that_cannot_be_written_closes_the_file_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class Full(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(28, "No space left on device")

    full = Full()
    monkeypatch.setattr(Path, "open", lambda self, mode="r": full)
    with pytest.raises(OSError, match="No space"):
        _write_block(tmp_path / "a.part", None, bytearray(b"x"), False, False)
    assert full.closed  # or its handle leaks, and on Windows the part file cannot be removed


@pytest.mark.parametrize("whole", [WHOLE_PNG, WHOLE_JPEG, WHOLE_WEBP], ids=["png", "jpeg", "webp"])
async def test_a_body_without_length_that_stops_short_of_the_image_end_is_not_placed(
    whole: bytes, mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    # No Content-Length: a connection closed early ends the body as cleanly as the server
    # would, so only the image's own end (IEND, EOI, the RIFF size) tells it was whole.
    cut = httpx.Response(200, stream=_Chunks(whole[:20], whole[20:-10]))
    route = mock.get(DELIVERY).mock(side_effect=[cut, httpx.Response(200, stream=_Chunks(whole))])
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == whole and route.call_count == 2
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    # Bytes that went out cannot be taken back: the stream says it was cut.
    mock.get(DELIVERY).mock(return_value=httpx.Response(200, stream=_Chunks(whole[:-10])))
    with pytest.raises(DownloadError, match="incomplete"):
        async for _ in downloader.stream(result_for(signed_url())):
            pass


def _gzip(*pieces: bytes, wbits: int = 31) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join(packer.compress(piece) for piece in pieces) + packer.flush()


async def test_a_compressed_body_is_inflated_in_pieces_the_cap_can_stop(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    # 64 MB of zeros behind a PNG signature is 64 KB of gzip: inflated at once, one such
    # body took 64 MB of memory whatever the cap.
    bomb = _gzip(PNG[:8], *[bytes(1 << 20)] * 64)
    assert len(bomb) < 100_000
    gzipped = {"content-encoding": "gzip", "content-length": str(len(bomb))}
    answer = httpx.Response(200, headers=gzipped, stream=_Chunks(bomb))  # content= is read
    mock.get(DELIVERY).mock(return_value=answer)
    tracemalloc.start()
    try:
        async with httpx.AsyncClient() as client:
            small = Downloader(client, max_bytes=1 << 20)
            with pytest.raises(DownloadRefusedError, match="larger than max_download_bytes"):
                await small.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("encoding", "wbits"),
    [("gzip", 31), ("x-gzip", 31), ("deflate", 15), ("deflate", -15)],
    ids=["gzip", "x-gzip", "deflate", "raw-deflate"],
)
async def test_a_compressed_image_is_saved_inflated(
    encoding: str, wbits: int, mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    big = WHOLE_PNG[:-12] + bytes(300_000) + WHOLE_PNG[-12:]  # more than one inflated piece
    packed = _gzip(big, wbits=wbits)
    pieces = [packed[i : i + 7] for i in range(0, len(packed), 7)]  # raw reads split anywhere
    answer = httpx.Response(200, headers={"content-encoding": encoding}, stream=_Chunks(*pieces))
    mock.get(DELIVERY).mock(return_value=answer)
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == big


async def test_a_compressed_body_cut_short_is_a_broken_transfer(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    packed = _gzip(WHOLE_PNG)  # cut in its trailer: the image inflates whole, the gzip not
    cut = httpx.Response(200, headers={"content-encoding": "gzip"}, stream=_Chunks(packed[:-6]))
    whole = httpx.Response(200, headers={"content-encoding": "gzip"}, stream=_Chunks(packed))
    route = mock.get(DELIVERY).mock(side_effect=[cut, whole])
    path = await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == WHOLE_PNG and route.call_count == 2


async def test_a_compression_the_client_cannot_bound_is_refused(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    route = mock.get(DELIVERY).respond(200, headers={"content-encoding": "br"}, content=b"x" * 50)
    with pytest.raises(DownloadRefusedError, match="compressed as 'br'") as e:
        await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=False)
    assert e.value.result.sample.startswith(DELIVERY) and route.call_count == 1


async def test_an_image_that_cannot_be_placed_leaves_no_part_file(
    mock: respx.MockRouter,
    downloader: Downloader,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (tmp_path / "a.png").mkdir()  # in the way: os.replace cannot put a file there
    (tmp_path / "a.png" / "x").write_bytes(b"")
    mock.get(DELIVERY).mock(return_value=image())
    with pytest.raises(IsADirectoryError):
        await downloader.to_directory(result_for(signed_url()), tmp_path, "a", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]

    def refused(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "link", refused)
    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(PermissionError):
        await downloader.to_directory(result_for(signed_url()), tmp_path, "b", overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["a.png"]


async def test_a_file_object_keeps_no_part_of_an_image_that_failed(
    mock: respx.MockRouter, tmp_path: Path
) -> None:
    short = httpx.Response(200, content=PNG[:100], headers={"content-length": str(len(PNG))})
    mock.get(DELIVERY).mock(return_value=short)
    async with httpx.AsyncClient() as client:
        downloader = Downloader(client, attempts=2, retry_base_delay=0.001, max_bytes=len(PNG))
        out = io.BytesIO(b"kept")
        out.seek(4)
        with pytest.raises(DownloadError, match=r"after 2 attempts \(truncated"):
            await downloader.to_file(result_for(signed_url()), out)
        assert out.getvalue() == b"kept"  # not the first 100 bytes of an image
        # Past the cap, with no Content-Length to refuse it before its first byte.
        mock.get(DELIVERY).mock(return_value=httpx.Response(200, stream=_Chunks(PNG, PNG)))
        refused = pytest.raises(DownloadRefusedError, match="larger than max_download_bytes")
        with (tmp_path / "a.png").open("wb") as file, refused:
            await downloader.to_file(result_for(signed_url()), file)
        assert (tmp_path / "a.png").read_bytes() == b""


async def test_a_refusal_before_an_s3_urls_expiry_keeps_the_paid_result(
    mock: respx.MockRouter, downloader: Downloader, tmp_path: Path
) -> None:
    signed = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    url = f"{DELIVERY}?X-Amz-Date={signed}&X-Amz-Expires=600&X-Amz-Signature=abc"
    route = mock.get(DELIVERY).mock(side_effect=[httpx.Response(403), image()])
    path = await downloader.to_directory(result_for(url), tmp_path, "a", overwrite=False)
    assert path.read_bytes() == PNG and route.call_count == 2
    # And refused past it: the image is gone, not asked for again.
    stale = url.replace(signed, "20240101T000000Z")
    route.side_effect = [httpx.Response(403)]
    with pytest.raises(ResultExpiredError, match="expired at 00:10:00 UTC"):
        await downloader.to_directory(result_for(stale), tmp_path, "b", overwrite=False)
    assert route.call_count == 3


@pytest.mark.parametrize(
    "name", ["CON", "nul", "com1.final", "LPT\u00b9", "a:b", 'say "hi"', "why?"]
)
def test_a_name_windows_would_make_something_else_of_is_refused_there(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `a:b.png` is a hidden stream of the file `a`; `CON.png` the console: a paid image lost.
    check_file_name("m", name)  # a plain name elsewhere
    monkeypatch.setattr("bfl_async._download._WINDOWS", True)
    with pytest.raises(ParameterError, match="not a device name"):
        check_file_name("m", name)
    check_file_name("m", "console")


async def test_an_answer_read_in_full_by_its_transport_is_saved(tmp_path: Path) -> None:
    # httpx.MockTransport hands over a body already read into memory (and decoded).
    packed = _gzip(WHOLE_PNG)
    short = {"content-length": str(len(WHOLE_PNG))}
    answers = [
        httpx.Response(200, content=WHOLE_PNG),
        httpx.Response(200, content=packed, headers={"content-encoding": "gzip"}),
        httpx.Response(200, content=WHOLE_PNG[:100], headers=short),  # still a truncation
        httpx.Response(200, content=WHOLE_PNG),
    ]
    transport = httpx.MockTransport(lambda request: answers.pop(0))
    async with httpx.AsyncClient(transport=transport) as client:
        downloader = Downloader(client, retry_base_delay=0.001)
        for name in ("plain", "gzipped", "retried"):
            path = await downloader.to_directory(
                result_for(signed_url()), tmp_path, name, overwrite=False
            )
            assert path.read_bytes() == WHOLE_PNG
    assert answers == []


async def test_a_result_url_that_does_not_parse_is_a_download_error_with_the_result(
    downloader: Downloader, tmp_path: Path
) -> None:
    result = result_for("https://d.example:port/a.png")
    with pytest.raises(DownloadError, match="does not parse") as caught:
        await downloader.to_directory(result, tmp_path, "a", overwrite=False)
    assert caught.value.result == result and list(tmp_path.iterdir()) == []
