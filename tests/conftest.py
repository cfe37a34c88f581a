import os
import sys

# Tests run on the CPU in float32; 8 simulated devices let mesh tests run anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Hermetic: no run of the suite reads or writes the user's compilation cache (whatever the
# environment says). It has a cache of its own instead, made afresh for each run of the suite
# and removed after it: the end-to-end runs compile the same programs again and again (the
# micro config's sampler, train step, reference pass), in this process, in the other xdist
# worker and in the subprocesses they start, all of which inherit these variables (the workers
# are started after this file is read). test_compile_cache.py points its subprocesses elsewhere.
SUITE_CACHE = "OPTUNE_JAX_SUITE_CACHE"
if SUITE_CACHE not in os.environ:  # the controller (or a lone process): it owns the directory
    import tempfile

    os.environ[SUITE_CACHE] = tempfile.mkdtemp(prefix="optune_jax_suite_cache_")
    _OWNS_CACHE = True
else:
    _OWNS_CACHE = False
os.environ["OPTUNE_JAX_CACHE"] = os.environ[SUITE_CACHE]
# Most tests compile many small programs that then run for milliseconds, where XLA's
# optimisation passes cost more than they save (the suite takes about 40 % less time without
# them; subprocesses inherit the variable). Tests that run a real model for long, or read the
# optimised program (its memory, its HLO), keep them: @pytest.mark.optimized.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

from optune_jax.run import compile_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
compile_cache.enable(None)  # the suite's own (OPTUNE_JAX_CACHE), never JAX_COMPILATION_CACHE_DIR


def pytest_unconfigure(config):
    if _OWNS_CACHE and not hasattr(config, "workerinput"):
        import shutil

        shutil.rmtree(os.environ[SUITE_CACHE], ignore_errors=True)


@pytest.fixture(autouse=True)
def _xla_optimizations(request):
    """XLA's full optimisation for a test marked `optimized` (programs compile on first call)."""
    if request.node.get_closest_marker("optimized") is None:
        yield
        return
    before = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", before)


def pytest_configure(config):
    # torch's OpenMP threads spin while they wait: with pytest-xdist's workers sharing the
    # cores, a torch op (transformers' forward, generate) runs ten times slower or worse unless
    # each worker keeps to its share of the cores (set before the test modules import torch)
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)


# The bundled SmolLM2-135M-Instruct, read once per worker by our GGUF loader and once by
# transformers' (its dequantizer; about 25 s): test_smollm2.py and test_gguf.py share both, and
# the "smollm2" group below keeps them on one pytest-xdist worker.
@pytest.fixture(scope="session")
def smollm2_ours():
    """(path, config, params) of the bundled GGUF through models.load_gguf."""
    from models import find_smollm2_gguf, load_gguf

    path = find_smollm2_gguf()
    return (path, *load_gguf(path))


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_ours):
    """The same file read by transformers: a float32 torch model in eval mode."""
    import torch
    import transformers

    path = smollm2_ours[0]
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()


# Scheduling under pytest-xdist (`make test`: -n 2). Tests that share an expensive fixture run
# on one worker: GROUPS maps node-id prefixes to a group. (pytest-xdist 3.8's own
# `--dist loadgroup` no longer groups under pytest 9.2, pytest-xdist#1386.) Then the longest
# tests first (LONGEST_FIRST; the others keep their order), so that the two workers finish
# together rather than one running a long test alone at the end.
GROUPS = {
    "tests/test_smollm2.py::": "smollm2",
    "tests/test_gguf.py::test_smollm2_params_match_transformers": "smollm2",
    # the tests that reuse test_loop's `uninterrupted` run (module scope: one run per worker)
    "tests/test_loop.py::test_a_run_killed_mid_iteration": "uninterrupted",
    "tests/test_loop.py::test_output_dir_guards_and_incompatible_resume": "uninterrupted",
    "tests/test_loop.py::test_failures_inside_the_checkpoint": "uninterrupted",
    "tests/test_loop.py::test_a_truncated_newest_checkpoint": "uninterrupted",
    "tests/test_loop.py::test_a_half_written_checkpoint": "uninterrupted",
    "tests/test_operations.py::test_a_line_lost": "uninterrupted",
    "tests/test_operations.py::test_the_report_says": "uninterrupted",
    "tests/test_operations.py::test_a_damaged_checkpoint": "uninterrupted",
}
LONGEST_FIRST = (
    "tests/test_loop.py::test_tiny_config_learns_and_accounts_for_generation",
    "tests/test_multihost.py::",
    "tests/test_sweep_report.py::test_sweep_then_report",
    "tests/test_loop.py::",
    "tests/test_sampler.py::test_shared_prefix_samples_equal_whole_prompts",
    "tests/test_lora.py::test_fresh_adapters_change_nothing_and_only_adapters_get_gradients",
    "tests/test_dryrun.py::",
    "tests/test_drift.py::",
)


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next(
            (i for i, key in enumerate(LONGEST_FIRST) if item.nodeid.startswith(key)),
            len(LONGEST_FIRST),
        )

    items.sort(key=rank)  # stable: ties keep the collection order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """-n N's default `--dist load` (or `loadgroup`), but each group of GROUPS goes to one
    worker as a unit (handed out first, the largest first), then the single tests in the order
    above."""
    if config.getvalue("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupsThenLoad(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            return next((g for p, g in GROUPS.items() if nodeid.startswith(p)), nodeid)

    return GroupsThenLoad(config, log)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """test_loop's micro run from start to end: (its final parameters, its output directory).
    Its users form one group in GROUPS: one run for them all under pytest-xdist."""
    import jax

    from optune_jax.loop import OptuneRun

    from .test_loop import micro_config

    tmp = tmp_path_factory.mktemp("uninterrupted")
    run = OptuneRun(micro_config(tmp), progress=False)
    run.run()
    params = jax.device_get(run.state.params)
    run.close()
    return params, tmp / "run"
