"""Output roots: nothing is deleted that the project did not write, an output never equals
or contains an input, and an interrupted write's staging folder does not outlive the next
write (local folders and the moto S3)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys

import pytest
from data_fixtures import good_images, write_folder

from cfebm.data import DataError, PrepareConfig, PyramidConfig, build_pyramid, prepare

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digits(out, **kw) -> dict:
    return prepare(PrepareConfig(source="digits", out=str(out), resolution=8, **kw))


def snapshot(folder) -> dict[str, bytes]:
    """Every file under ``folder`` with its content."""
    out = {}
    for base, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(base, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture
def images(tmp_path):
    """An image folder with a README beside the images (the source of a folder dataset)."""
    folder = tmp_path / "photos"
    good = good_images()
    write_folder(folder, {rel: data for rel, (data, _, _) in good.items()})
    write_folder(folder, {"notes/todo.txt": b"keep me"})
    return folder


def test_prepare_into_its_source_folder_is_refused(images):
    before = snapshot(images)
    with pytest.raises(DataError, match="contains the input"):
        prepare(PrepareConfig(source="folder", url=str(images), out=str(images), resolution=8))
    with pytest.raises(DataError, match="contains the input"):  # a parent of the source too
        prepare(PrepareConfig(source="folder", url=str(images), out=str(images.parent)))
    assert snapshot(images) == before


@pytest.mark.parametrize("where", ["cwd", "parent"])
def test_prepare_into_a_folder_of_other_data_is_refused(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    write_folder(work, {"thesis.tex": b"chapter 1", "data/raw.csv": b"1,2,3"})
    before = snapshot(work)
    monkeypatch.chdir(work)
    out = "." if where == "cwd" else str(work / "data")
    with pytest.raises(DataError, match="already holds other data") as info:
        digits(out)
    assert "manifest.json" in str(info.value) and out in str(info.value)
    assert snapshot(work) == before


def test_pyramid_never_replaces_its_input(tmp_path):
    digits(tmp_path / "data" / "prepared")
    before = snapshot(tmp_path / "data")
    for out in (tmp_path / "data", tmp_path / "data" / "prepared"):
        with pytest.raises(DataError, match="contains the input"):
            build_pyramid(PyramidConfig(input=str(tmp_path / "data/prepared"), out=str(out)))
    assert snapshot(tmp_path / "data") == before


def test_a_dataset_root_or_an_empty_folder_is_replaced(tmp_path):
    digits(tmp_path / "prepared", seed=0)
    digits(tmp_path / "prepared", seed=1)  # its own dataset: replaced
    (tmp_path / "empty").mkdir()
    digits(tmp_path / "empty")
    assert (tmp_path / "empty" / "manifest.json").exists()
    with pytest.raises(DataError, match="not a directory"):
        (tmp_path / "file").write_text("x")
        digits(tmp_path / "file")


def test_staging_of_an_interrupted_write_is_removed(tmp_path):
    stale = tmp_path / ".prepared.tmp-0badc0de"
    write_folder(stale, {"train/r8/images-00000.npy": b"\0" * 1000})
    old = tmp_path / ".prepared.old-12345678"
    write_folder(old, {"manifest.json": b"{}"})
    lines = []
    digits(tmp_path / "prepared")
    prepare(
        PrepareConfig(source="digits", out=str(tmp_path / "again"), resolution=8),
        progress=lines.append,
    )
    assert not stale.exists() and not old.exists()
    assert sorted(os.listdir(tmp_path)) == ["again", "prepared"]
    assert not any("staging" in line for line in lines)  # nothing stale for "again"


def test_the_cli_names_the_problem_in_one_line(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    done = subprocess.run(
        [sys.executable, "-m", "pipelines.prepare", "--out", ".", "--source", "digits"],
        cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("prepare: error: output . already")
    assert "Traceback" not in done.stderr
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_s3_bucket_and_input_prefix_are_never_replaced(s3_env):
    import s3fs

    fs = s3fs.S3FileSystem()
    bucket = s3_env.removeprefix("s3://")
    fs.pipe_file(f"{bucket}/other/team-data.bin", b"theirs")
    with pytest.raises(DataError, match="already holds other data"):
        digits(s3_env)  # the whole bucket
    prepared = f"{s3_env}/cfebm/prepared"
    digits(prepared)
    with pytest.raises(DataError, match="contains the input"):
        build_pyramid(PyramidConfig(input=prepared, out=f"{s3_env}/cfebm"))
    fs.invalidate_cache()
    assert fs.cat_file(f"{bucket}/other/team-data.bin") == b"theirs"
    assert fs.exists(f"{bucket}/cfebm/prepared/manifest.json")
    build_pyramid(PyramidConfig(input=prepared, out=f"{s3_env}/cfebm/pyramid"))  # fine


def test_an_unreachable_s3_endpoint_is_one_line_naming_it(tmp_path):
    with socket_closed_port() as port:
        env = {**os.environ, "PYTHONPATH": ROOT, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
               "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "pipelines.pyramid", "--input", "s3://bucket/prepared",
             "--out", str(tmp_path / "p")],
            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=60,  # bounded
        )  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "pyramid: error: cannot read the dataset at s3://bucket/prepared: the storage "
        f"endpoint http://127.0.0.1:{port} does not answer; check AWS_ENDPOINT_URL (or "
        "storage_options.endpoint_url) and that the server runs"
    ]


@contextlib.contextmanager
def socket_closed_port():
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


def test_report_folders_left_by_killed_workers_are_removed_and_nothing_else(tmp_path, monkeypatch):
    """A worker killed while it wrote a checkpoint leaves its cfebm-ckpt-<pid>-* folder in
    the temporary folder; the next worker's first report removes such folders of dead
    processes, and keeps those of live processes, fresh ones and anything else."""
    import tempfile
    import time

    from cfebm import io as cio

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setattr(cio, "_swept", set())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, old = int(dead.stdout), time.time() - 2 * cio.STALE_REPORT_S
    folders = {
        "stale": f"cfebm-ckpt-{dead_pid}-abc",
        "live": f"cfebm-ckpt-{os.getpid()}-def",
        "fresh": f"cfebm-ckpt-{dead_pid}-ghi",
        "other kind": f"cfebm-tune-{dead_pid}-jkl",
        "no pid": "cfebm-ckpt-notapid",
    }
    for name in folders.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer.pt").write_bytes(b"x" * 100)
        if name != folders["fresh"]:
            os.utime(tmp_path / name, (old, old))
    with cio.report_dir("ckpt") as d:
        assert os.path.basename(d).startswith(f"cfebm-ckpt-{os.getpid()}-")
        assert os.path.dirname(d) == str(tmp_path)
    assert not os.path.exists(d)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(v for k, v in folders.items() if k != "stale")
    with cio.report_dir("ckpt"):  # swept once per process and kind
        pass
    os.utime(tmp_path / folders["fresh"], (old, old))
    assert cio.sweep_reports("ckpt") == [str(tmp_path / folders["fresh"])]
