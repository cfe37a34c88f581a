"""The persistent compilation cache: where it goes (env over config), errors, a real cache hit."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from optune_jax import train
from optune_jax.run import compile_cache
from optune_jax.run.compile_cache import ENV, resolve
from optune_jax.run.config_file import load_config
from optune_jax.run.errors import RunError

REPO = Path(__file__).resolve().parents[1]


def test_the_suite_uses_a_fresh_cache_of_its_own_never_the_users():
    """conftest points the cache at a directory made for this run of the suite."""
    import tempfile

    ours = Path(os.environ["OPTUNE_JAX_SUITE_CACHE"])
    assert os.environ[ENV] == str(ours) and ours.is_relative_to(tempfile.gettempdir())
    assert resolve(None) == ours != resolve("auto", {k: v for k, v in os.environ.items()
                                                      if k != ENV})


@pytest.mark.parametrize(
    ("setting", "env", "want"),
    [
        ("auto", {"XDG_CACHE_HOME": "/xdg"}, "/xdg/optune_jax/jax"),
        ("auto", {"XDG_CACHE_HOME": "relative/ignored"}, "~/.cache/optune_jax/jax"),
        ("auto", {}, "~/.cache/optune_jax/jax"),
        ("/from/config", {}, "/from/config"),
        ("~/c", {}, "~/c"),
        (None, {}, None),
        ("off", {}, None),
        (None, {ENV: "/from/env"}, "/from/env"),  # the environment wins over the config
        ("/from/config", {ENV: "/from/env"}, "/from/env"),
        ("/from/config", {ENV: "OFF"}, None),
        ("/from/config", {ENV: "auto", "XDG_CACHE_HOME": "/xdg"}, "/xdg/optune_jax/jax"),
        ("/from/config", {ENV: ""}, "/from/config"),  # empty: unset
    ],
)
def test_resolve(setting, env, want):
    got = resolve(setting, env)
    assert got == (None if want is None else Path(want).expanduser())


def test_resolve_relative_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("cache", {}) == tmp_path / "cache"


@pytest.mark.parametrize(("setting", "env", "message"), [
    ("  ", {}, "run.compilation_cache: empty"),
    ("auto", {ENV: " "}, f"{ENV}: empty"),
])
def test_empty_values_are_refused(setting, env, message):
    with pytest.raises(RunError, match=message):
        resolve(setting, env)


def test_config_key():
    assert load_config(None, []).run.compilation_cache == "auto"
    assert load_config(None, ["run.compilation_cache=null"]).run.compilation_cache is None


def test_a_file_in_the_way_stops_the_cli_with_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(ENV, str(tmp_path / "file" / "jax"))
    args = ["--config", str(REPO / "configs/tiny.yaml"), f"--set=run.output_dir={tmp_path}/run"]
    assert train.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: cannot use the compilation cache {tmp_path}/file/jax: {tmp_path}/file "
                   f"is a file, not a directory (or set {ENV}=off)"), err
    assert not (tmp_path / "run").exists()  # stopped before the run directory was made
    with pytest.raises(RunError, match=re.escape(f"{tmp_path}/file is a file, not a dir")):
        compile_cache.enable("auto", {ENV: str(tmp_path / "file")})


PROBE = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from jax import monitoring
    from optune_jax.run import compile_cache
    events = []
    monitoring.register_event_listener(lambda name, **_: events.append(name))
    path = compile_cache.enable(None)  # the directory comes from the environment
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    f(jnp.ones((8, 8))).block_until_ready()
    hits = events.count("/jax/compilation_cache/cache_hits")
    misses = events.count("/jax/compilation_cache/cache_misses")
    print(json.dumps({"path": str(path), "hits": hits, "misses": misses}))
""")


def test_a_second_process_loads_the_compiled_program(tmp_path):
    env = {**os.environ, ENV: str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}

    def probe() -> dict:
        out = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=REPO, check=True,
                             capture_output=True, text=True, timeout=120)
        return json.loads(out.stdout.strip().splitlines()[-1])

    first = probe()
    assert first["path"] == str(tmp_path / "cache")
    assert first["misses"] > 0 and first["hits"] == 0, first
    assert any((tmp_path / "cache").iterdir())
    second = probe()
    assert second["hits"] == first["misses"] and second["misses"] == 0, second
