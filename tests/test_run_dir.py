"""The output directory: every file system failure is one line naming the path and the cause."""

import errno
from pathlib import Path

import pytest

from optune_jax.run.errors import RunError, describe_os_error, file_error
from optune_jax.run.run_dir import prepare_run_dir, replace_dir

CONFIG = {"optune": {"rho": 0.5}, "run": {"output_dir": "x"}}


def _refused(out, **kw) -> str:
    with pytest.raises(RunError) as info:
        prepare_run_dir(Path(out), CONFIG, resume=kw.get("resume", False),
                        overwrite=kw.get("overwrite", False), resumable=("run.output_dir",))
    message = str(info.value)
    assert "\n" not in message and "--" not in message  # no command-line words in the core
    return message


def test_an_output_directory_under_a_file_or_on_a_read_only_file_system(tmp_path):
    # issue 20, case 6
    readme = tmp_path / "README.md"
    readme.write_text("hello")
    assert _refused(readme / "sub") == (
        f"cannot use the output directory {readme / 'sub'}: {readme} is a file, not a directory"
    )
    assert _refused(readme, overwrite=True) == (
        f"cannot use the output directory {readme}: it is a file"
    )
    assert readme.read_text() == "hello"  # never deleted, not even to overwrite
    if Path("/proc/self").is_dir():  # Linux: /proc takes no new directories
        assert _refused("/proc/x") == (
            "cannot use the output directory /proc/x: the file system at /proc refuses new "
            "entries (no such file or directory)"
        )


@pytest.mark.parametrize(
    ("code", "cause"),
    [(errno.EACCES, "permission denied"), (errno.ENOSPC, "no space left on device"),
     (errno.EROFS, "read-only file system")],
)
def test_permission_and_space_errors_leave_nothing_half_written(tmp_path, monkeypatch, code,
                                                                cause):
    out = tmp_path / "run"

    def fails(self, *args, **kwargs):
        raise OSError(code, "the C library's words", str(self))

    monkeypatch.setattr(Path, "write_text", fails)
    assert _refused(out) == f"cannot use the output directory {out}: {cause}"
    assert list(out.iterdir()) == []  # no config.yaml, not even a part of one


def test_a_damaged_stored_config_refuses_to_resume(tmp_path):
    out = tmp_path / "run"
    prepare_run_dir(out, CONFIG, resume=False, overwrite=False)
    (out / "config.yaml").write_text("optune: {rho: [0.5\n")
    assert _refused(out, resume=True).startswith(
        f"cannot resume {out}: {out / 'config.yaml'} is damaged: "
    )
    assert _refused(out) == f"{out} already holds a run; resume it or overwrite it"


def test_replace_dir_leaves_the_old_directory_when_the_write_fails(tmp_path):
    target = tmp_path / "model"
    replace_dir(target, lambda p: (p.mkdir(), (p / "w").write_text("old")))

    def half_then_full(p):
        p.mkdir()
        (p / "w").write_text("new, cut")
        raise OSError(errno.ENOSPC, "No space left on device", str(p / "w"))

    with pytest.raises(RunError, match=f"^cannot write {target}: no space left on device$"):
        replace_dir(target, half_then_full)
    assert (target / "w").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no partial left over


def test_causes_in_words(tmp_path):
    missing = OSError(errno.ENOENT, "No such file or directory", str(tmp_path / "nope"))
    assert describe_os_error(missing) == "no such file or directory"
    odd = OSError(errno.EBUSY, "Device or resource busy", "/dev/x")
    assert str(file_error("open", "/dev/x", odd)) == "cannot open /dev/x: device or resource busy"
