"""The run's options: every default written once, every value checked once, before any work."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import PROJECT, TINY, base_env
from pixelsim import OptionError, Options, PixelsimError
from pixelsim.tasks.contracts import Request


def test_defaults_and_normalised_values():
    o = Options()
    assert (o.metric, o.shard_size, o.channels, o.resize, o.classes, o.skip_bad, o.device) == \
        ("l1", 5000, 1, None, None, 0, "cpu")
    o = Options(resize=[14, 28], classes=[" 3", "7 "])
    assert o.resize == (14, 28) and o.classes == ("3", "7")
    assert o.to_dict()["resize"] == [14, 28] and o.to_dict()["classes"] == ["3", "7"]


@pytest.mark.parametrize("options,message", [
    ({"shard_size": 0}, "--shard-size 0: must be 1 to 2147483647"),
    ({"shard_size": 10**23}, "--shard-size 100000000000000000000000: must be 1 to 2147483647"),
    ({"skip_bad": 10**23}, "--skip-bad 100000000000000000000000: must be 0 to 2147483647"),
    ({"shard_size": True}, "--shard-size True: expected a whole number"),
    ({"channels": 2}, "--channels 2: use 1"),
    ({"skip_bad": -1}, "--skip-bad -1: must be 0 to 2147483647"),
    ({"metric": "cosine"}, "--metric cosine: use one of l1, rmse"),
    ({"resize": (0, 0)}, "--resize 0x0: expected HxW"),
    ({"resize": (28,)}, "--resize 28: expected HxW"),
    ({"classes": ["3", "3"]}, "--classes 3,3: a class is named twice"),
    ({"classes": ["3", ""]}, "--classes 3,: give class folder names"),
    ({"classes": ["7"]}, "--classes 7: name at least two classes"),
    ({"train_split": "a/b"}, "--train-split 'a/b': expected a folder name"),
])
def test_a_bad_option_is_one_error_naming_it(options, message):
    with pytest.raises(OptionError) as e:
        Options(**options)
    assert str(e.value).startswith(message) and isinstance(e.value, PixelsimError)


@pytest.mark.parametrize("request_args,message", [
    ({"dataset": "../../etc"}, "--dataset: dataset name '../../etc'"),
    ({"dataset": "a/b"}, "--dataset: dataset name 'a/b'"),
    ({"source": ""}, "--source is empty"),
    ({"source": "x.tgz", "sha256": "abc"}, "--sha256 'abc': expected 64 hexadecimal digits"),
    ({"root": ""}, "--root is empty"),
    ({"shard_sise": 3}, "unknown option(s): shard_sise"),
])
def test_a_bad_request_is_one_error_naming_the_option(request_args, message):
    with pytest.raises(OptionError) as e:
        Request.build(**request_args)
    assert str(e.value).startswith(message)


@pytest.mark.parametrize("name,value,message", [
    ("PIXELSIM_DECODE_WORKERS", "abc", "PIXELSIM_DECODE_WORKERS='abc': expected a whole number, at least 0"),
    ("PIXELSIM_MAX_DOWNLOAD_BYTES", "abc", "PIXELSIM_MAX_DOWNLOAD_BYTES='abc': expected a whole number, at least 1"),
    ("PIXELSIM_MAX_DOWNLOAD_BYTES", "0", "PIXELSIM_MAX_DOWNLOAD_BYTES='0': expected a whole number, at least 1"),
    ("PIXELSIM_SHARD_BYTES", "1e9", "PIXELSIM_SHARD_BYTES='1e9': expected a whole number, at least 1"),
    ("PIXELSIM_MAX_MEMORY", "١٢", "PIXELSIM_MAX_MEMORY='١٢': expected a whole number"),
    ("PIXELSIM_OFFLINE", "sometimes", "PIXELSIM_OFFLINE='sometimes': expected 1 or 0"),
])
def test_a_bad_environment_variable_is_one_error_naming_it_before_any_work(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(OptionError) as e:
        Request.build()
    assert str(e.value).startswith(message)


def test_a_lock_dir_that_is_a_file_is_one_error_before_any_work_and_the_file_survives(tmp_path, monkeypatch):
    """PIXELSIM_LOCK_DIR naming a file (a typo, a path meant for something else) is refused
    before any work, naming it: it is the user's file, outside the root, and is never replaced."""
    notes = tmp_path / "notes.txt"
    notes.write_text("precious notes")
    for value, extra in ((notes, ""), (notes / "locks", f" ({notes} is a file)")):
        monkeypatch.setenv("PIXELSIM_LOCK_DIR", str(value))
        with pytest.raises(OptionError) as e:
            Request.build()
        assert str(e.value) == f"PIXELSIM_LOCK_DIR={str(value)!r}: not a folder{extra}"
    code = "import sys; from pixelsim.flows.cli import main; sys.exit(main(sys.argv[1:]))"
    p = subprocess.run([sys.executable, "-c", code, "run", "--source", str(TINY), "--root", str(tmp_path / "root")],
                       capture_output=True, text=True, timeout=60, cwd=PROJECT,
                       env={**base_env(tmp_path / "home"), "PIXELSIM_LOCK_DIR": str(notes)})
    assert p.returncode == 2, p.stderr
    assert p.stderr == f"pixelsim: error: PIXELSIM_LOCK_DIR={str(notes)!r}: not a folder\n"
    assert notes.read_text() == "precious notes" and not (tmp_path / "root").exists()
    monkeypatch.setenv("PIXELSIM_LOCK_DIR", str(tmp_path / "new" / "locks"))   # one to be made is fine
    assert Request.build().dataset == "mnist_sample"


def test_environment_flags_and_numbers_that_are_read(monkeypatch):
    from pixelsim.storage.fetch import max_bytes
    from pixelsim.tasks import pool
    for value, offline in (("on", True), ("YES", True), ("0", False), ("off", False), ("", False)):
        monkeypatch.setenv("PIXELSIM_OFFLINE", value)
        assert Request.build().offline is offline, value
    monkeypatch.setenv("PIXELSIM_MAX_DOWNLOAD_BYTES", " 1000 ")
    monkeypatch.setenv("PIXELSIM_DECODE_WORKERS", "0")
    assert max_bytes() == 1000 and pool.workers() == 0


def test_the_dataset_defaults_to_the_sources_name():
    assert Request.build().dataset == "mnist_sample"
    assert Request.build(source="https://h/x/Foo.tar.gz?sig=1").dataset == "foo"


def test_the_cli_refuses_a_bad_option_in_one_line_before_prefect_starts(tmp_path):
    code = ("import sys; from pixelsim.flows.cli import main; rc = main(sys.argv[1:]); "
            "assert 'prefect' not in sys.modules, 'prefect imported'; sys.exit(rc)")
    for args, line in ((["--shard-size", "0"], "--shard-size 0: must be 1 to"),
                       (["--resize", "0x0"], "--resize 0x0"), (["--classes", "3,3"], "a class is named twice"),
                       (["--source", ""], "--source is empty"), (["--dataset", "../x"], "dataset name '../x'")):
        p = subprocess.run([sys.executable, "-c", code, "run", "--root", str(tmp_path / "root"), *args],
                           capture_output=True, text=True, timeout=60, cwd=PROJECT, env=base_env(tmp_path / "home"))
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and p.stderr.startswith("pixelsim: error: ") and line in p.stderr, p.stderr
        assert not (tmp_path / "root").exists()


def test_version_is_the_installed_one(tmp_path):
    import tomllib

    want = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]["version"]
    p = subprocess.run([sys.executable, "-m", "pixelsim.flows.cli", "--version"], capture_output=True, text=True,
                       timeout=60, env=base_env(tmp_path / "home"), cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == f"pixelsim {want}", p.stderr
    import pixelsim
    assert pixelsim.__version__ == want


@pytest.mark.parametrize("args,line,code", [
    (["run", "--dataset", "mnist_smaple"], "--dataset mnist_smaple: not a named dataset; did you mean mnist_sample?", 2),
    (["run", "--source", "/nowhere/x.tgz"], "--source /nowhere/x.tgz: no such file or folder", 2),
    (["run", "--source", "/dev/zero"], "--source /dev/zero: not a regular file or folder", 2),
    (["run", "--workers", "0"], "argument --workers: expected a whole number of at least 1, got '0'", 2),
    (["serve", "--cron", "0 2 * * *", "--name", "a/b"], "argument --name: 'a/b': a deployment name is 1 to 100 "
     "printable characters, no '/'", 2),
    (["serve", "--cron", "0 2 * * *", "--name", " "], "argument --name: ' ': a deployment name", 2),
    (["run", "--workers", "99999999999999999999"], f"argument --workers: 99999999999999999999 is more than 4 per core "
     f"on this machine ({4 * (os.cpu_count() or 1)})", 2),
    (["run", "--shard-sise", "3"], "unrecognized arguments: --shard-sise 3 (did you mean --shard-size?)", 2),
    (["rn"], "invalid choice: 'rn'", 2),
    (["show", "--root", "foo://x"], "pixelsim: error: --root foo://x: not a usable storage root: ValueError: "
     "Protocol not known: foo", 1),
    (["runs", "--root", f"zip://x::{TINY}"], "not a usable storage root: BadZipFile: File is not a zip file", 1),
    (["run", "--device", "tpu9"], "--device tpu9: ", 1),
    (["run", "--task-runner", "dask", "--dask-address", "garbage!!"], "--dask-address 'garbage!!': ", 2),
    (["run", "--dask-address", "127.0.0.1:8786"], "--dask-address needs --task-runner dask", 2),
    (["server", "start", "--port", "70000"], "expected a TCP port, 1 to 65535, got '70000'", 2),
])
def test_mistakes_are_caught_before_any_flow_run(tmp_path, args, line, code):
    p = subprocess.run([sys.executable, "-m", "pixelsim.flows.cli", *args, *(["--root", str(tmp_path / "r")]
                        if args[0] == "run" else [])], capture_output=True, text=True, timeout=60,
                       env=base_env(tmp_path / "home"), cwd=tmp_path)
    assert p.returncode == code, p.stderr
    assert line in p.stderr and "Beginning flow run" not in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "home" / "prefect.db").exists()          # Prefect never started
    if args == ["rn"]:
        assert "(did you mean run?)" in p.stderr


def test_help_shows_defaults_examples_and_the_environment(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pixelsim.flows.cli", "run", "--help"], capture_output=True, text=True,
                       timeout=60, env=base_env(tmp_path / "home"), cwd=tmp_path)
    text = " ".join(p.stdout.split())
    assert p.returncode == 0
    assert "images per Parquet shard (default: 5000)" in text and "(default: l1)" in text
    assert "pixelsim run --dataset mnist_tiny" in text and "PIXELSIM_OFFLINE=1" in text and "PIXELSIM_ROOT" in text


@pytest.fixture(scope="module")
def unpacked_tiny(tmp_path_factory):
    """A root holding mnist_tiny's archive, unpacked, under both keys a local source can have:
    pinned by --sha256, and unpinned (keyed by the file's fingerprint)."""
    import hashlib

    from pixelsim.storage.sources import fingerprint
    from pixelsim.tasks.download import download_archive
    from pixelsim.tasks.untar import untar_archive

    root = str(tmp_path_factory.mktemp("layout-root"))
    sha = hashlib.sha256(TINY.read_bytes()).hexdigest()
    for pins, fp in (({"sha256": sha}, {}), ({}, fingerprint(str(TINY)))):
        untar_archive(download_archive(str(TINY), root, pins, fingerprint=fp).value)
    return root, sha


@pytest.mark.parametrize("pinned", [True, False], ids=["sha256-pinned", "local-unpinned"])
@pytest.mark.parametrize("args,line", [
    (["--classes", "3,8"], "--classes 8: no such folder in mnist_tiny/train/ (found 3, 7)"),
    (["--valid-split", "vaild"], "--valid-split vaild: no such folder in mnist_tiny/ (did you mean valid?"),
    (["--train-split", "trian"], "--train-split trian: no such folder in mnist_tiny/ (did you mean train?"),
])
def test_a_split_or_class_not_in_the_cached_archive_is_refused_before_prefect(tmp_path, unpacked_tiny, pinned,
                                                                             args, line):
    root, sha = unpacked_tiny
    code = ("import sys; from pixelsim.flows.cli import main; rc = main(sys.argv[1:]); "
            "assert 'prefect' not in sys.modules, 'prefect imported'; sys.exit(rc)")
    pin = ["--sha256", sha] if pinned else []
    p = subprocess.run([sys.executable, "-c", code, "run", "--source", str(TINY), *pin, "--root", root, *args],
                       capture_output=True, text=True, timeout=60, cwd=PROJECT, env=base_env(tmp_path / "home"))
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("pixelsim: error: ") and line in p.stderr, p.stderr
