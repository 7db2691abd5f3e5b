"""examples/: each script runs as a user would run it, with --fake, and does what it says.

The FastAPI example (examples/fastapi_app) is run under uvicorn by tests/test_fastapi_app.py
(and under `uvicorn --workers 2` by tests/test_workers.py, which also runs the arq workers of
examples/workers).
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bfl_async import AsyncBFL, Backoff
from bfl_async.testing import FakeBFL
from bfl_async.testing._images import render
from examples import kontext_edit

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")
SCRIPTS = ("single_image.py", "gather_batch.py", "kontext_edit.py", "trio_example.py")


def run(
    script: str, *args: str, cwd: Path, fake_scale: str | None = "0.05"
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BFL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["COLUMNS"] = "120"
    if fake_scale is not None:
        env["BFL_FAKE_TIME_SCALE"] = fake_scale
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def saved_images(stdout: str) -> list[Path]:
    """The image paths a script printed, each checked to be a real image file."""
    paths = [Path(p) for p in re.findall(r"(\S+\.(?:jpg|png|webp))\b", stdout)]
    for path in paths:
        assert path.is_file() and path.read_bytes().startswith(IMAGE_MAGIC), path
    return paths


def png(path: Path, key: str) -> Path:
    path.write_bytes(b"".join(render("png", key, (32, 32))))
    return path


def test_every_example_script_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(SCRIPTS)


def test_single_image(tmp_path: Path) -> None:
    done = run("single_image.py", "a red fox", "-o", str(tmp_path / "out"), "--fake", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [image] = saved_images(done.stdout)
    assert image.parent == tmp_path / "out"
    assert re.search(r"task \S+, seed \d+, cost 3\.0 credits", done.stdout)


def test_single_image_on_a_model_sized_by_aspect_ratio(tmp_path: Path) -> None:
    done = run(
        "single_image.py", "a fox", "--model", "flux-kontext-pro", "-o", str(tmp_path / "out"),
        "--fake", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [image] = saved_images(done.stdout)
    assert image.parent == tmp_path / "out"
    assert "cost not reported (FLUX.1)" in done.stdout


def test_gather_batch_with_progress(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n\na boat\na teapot\na kite\n", encoding="utf-8")
    out = tmp_path / "out"
    done = run("gather_batch.py", str(prompts), "-o", str(out), "--fake", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    images = saved_images(done.stdout)
    assert len(images) == len(set(images)) == 4
    assert sorted(out.iterdir()) == sorted(images)
    assert "images" in done.stdout and "4/4" in done.stdout  # the progress bar's last state
    assert "4 of 4 images saved, 5.6 credits" in done.stdout


def test_gather_batch_default_prompts(tmp_path: Path) -> None:
    done = run("gather_batch.py", "-o", str(tmp_path / "out"), "--fake", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert len(saved_images(done.stdout)) == 12
    assert "12 of 12 images saved" in done.stdout


def test_kontext_edit(tmp_path: Path) -> None:
    photo, lamp = png(tmp_path / "room.png", "room"), png(tmp_path / "lamp.png", "lamp")
    done = run(
        "kontext_edit.py", str(photo), "put the lamp on the desk", "--reference", str(lamp),
        "--model", "flux-kontext-max", "-o", str(tmp_path / "out"), "--fake", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [image] = saved_images(done.stdout)
    assert image.parent == tmp_path / "out"
    assert "on flux-kontext-max, 2 input image(s)" in done.stdout


def test_kontext_edit_refuses_a_missing_image_before_sending(tmp_path: Path) -> None:
    done = run(
        "kontext_edit.py", str(tmp_path / "nope.png"), "x", "-o", str(tmp_path), "--fake",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1
    assert "nothing was sent" in done.stderr and "no such file" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.anyio
async def test_kontext_edit_sends_the_images_as_input_images(tmp_path: Path) -> None:
    photo, lamp = png(tmp_path / "room.png", "room"), png(tmp_path / "lamp.png", "lamp")
    url = "https://example.com/chair.jpg"
    fake = FakeBFL(time_scale=0.01)
    async with (
        fake.client() as http,
        AsyncBFL(
            api_key=fake.api_key,
            http_client=http,
            poll_schedule=Backoff(initial=0.01, maximum=0.05),
        ) as client,
    ):
        image = await kontext_edit.edit(
            client, photo, "add the lamp and the chair", [lamp, url], aspect_ratio="16:9",
            output_dir=tmp_path / "out",
        )  # fmt: skip
    [task] = fake.tasks.values()
    assert task.model == "flux-kontext-pro" and image.task_id == task.id
    assert task.body["prompt"] == "add the lamp and the chair"
    assert task.body["input_image"] == base64.b64encode(photo.read_bytes()).decode()
    assert task.body["input_image_2"] == base64.b64encode(lamp.read_bytes()).decode()
    assert task.body["input_image_3"] == url  # a URL is sent as is, for BFL to fetch
    assert task.body["aspect_ratio"] == "16:9"
    assert "input_image_4" not in task.body


def test_trio_example(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = run(
        "trio_example.py", "a fox", "a boat", "a kite", "-o", str(out), "--fake", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert len(saved_images(done.stdout)) == 3
    assert "ran under trio" in done.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_without_a_key_the_examples_say_so_and_send_nothing(script: str, tmp_path: Path) -> None:
    args = {"kontext_edit.py": [str(png(tmp_path / "a.png", "a")), "x"]}.get(script, ["a fox"])
    if script == "gather_batch.py":
        args = []
    done = run(script, *args, "-o", str(tmp_path / "out"), cwd=tmp_path, fake_scale=None)
    assert done.returncode == 2
    assert "BFL_API_KEY" in done.stderr and "--fake" in done.stderr
    assert not (tmp_path / "out").exists()
