import dataclasses

import pytest
import yaml

from optune_jax.run.config_file import config_to_dict, describe_options, load_config
from optune_jax.run.errors import ConfigError
from optune_jax.run.schema import RunConfig, TrainSection


def _error(overrides, path=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def _write(tmp_path, text: str):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults_without_a_file():
    assert load_config(None, []) == RunConfig()


def test_defaults_round_trip_through_yaml(tmp_path):
    cfg = RunConfig()
    path = _write(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path, []) == cfg


def test_non_default_round_trip(tmp_path):
    cfg = load_config(None, ["train.max_grad_norm=null", "data.eval_files=[]",
                             "model.random.sliding_window=8", "train.learning_rate=3e-6"])
    path = _write(tmp_path, yaml.safe_dump(config_to_dict(cfg)))
    assert load_config(path, []) == cfg


def test_yaml_file_and_overrides(tmp_path):
    text = "optune:\n  rho: 0.7\n  selection: random\ntrain:\n  learning_rate: 1e-6\n"
    path = _write(tmp_path, text)
    cfg = load_config(path, ["optune.rho=0.3", "model.random.hidden_size=32"])
    assert cfg.optune.rho == 0.3  # the override wins over the file
    assert cfg.optune.selection == "random"
    assert cfg.train.learning_rate == 1e-6  # "1e-6" is a float, not PyYAML 1.1's string
    assert cfg.model.random.hidden_size == 32
    assert cfg.model.random.num_hidden_layers == RunConfig().model.random.num_hidden_layers


def test_list_null_and_int_for_float():
    cfg = load_config(None, [
        "data.train_files=[a.jsonl, b.parquet]",
        "data.eval_files=[]",
        "train.max_grad_norm=null",
        "data.num_train_prompts=16",
        "sampling.temperature=2",
    ])
    assert cfg.data.train_files == ("a.jsonl", "b.parquet")
    assert cfg.data.eval_files == ()
    assert cfg.train.max_grad_norm is None
    assert cfg.data.num_train_prompts == 16
    assert cfg.sampling.temperature == 2.0 and isinstance(cfg.sampling.temperature, float)
    hash(cfg)  # frozen and hashable


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().optune.rho = 0.2


@pytest.mark.parametrize("override, message", [
    ("optune.rhoo=0.5", "unknown key 'optune.rhoo'; did you mean 'optune.rho'?"),
    ("optun.rho=0.5", "unknown key 'optun'; did you mean 'optune'?"),
    ("train.seed=1", "unknown key 'train.seed'; did you mean 'run.seed'?"),
    ("model.random.hidden_sise=8",
     "unknown key 'model.random.hidden_sise'; did you mean 'model.random.hidden_size'?"),
    ("optune.zzz=1",
     "unknown key 'optune.zzz'; valid keys here: iterations, rho, selection, rank_key, reference"),
])
def test_unknown_keys_name_the_nearest(override, message):
    assert _error([override]) == message


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=abc",
     "train.learning_rate='abc' has the wrong type: expected float, got str"),
    ("train.epochs=1.5", "train.epochs=1.5 has the wrong type: expected int, got float"),
    ("train.epochs=true", "train.epochs=true has the wrong type: expected int, got bool"),
    ("loss.average_logps=1", "loss.average_logps=1 has the wrong type: expected bool, got int"),
    ("data.train_files=a.jsonl",
     "data.train_files='a.jsonl' has the wrong type: expected list[str], got str"),
    ("data.train_files=[a.jsonl, 3]",
     "data.train_files[1]=3 has the wrong type: expected str, got int"),
    ("train.epochs=null",
     "train.epochs=null is not allowed: expected int (null is allowed only for optional fields)"),
    ("optune=0.5", "optune=0.5 has the wrong type: expected a mapping of keys, got float"),
])
def test_wrong_types(override, message):
    assert _error([override]) == message


@pytest.mark.parametrize("override, message", [
    ("optune.rho=1.5", "optune.rho=1.5 is out of range (0, 1]"),
    ("optune.rho=0", "optune.rho=0.0 is out of range (0, 1]"),
    ("train.warmup_ratio=1", "train.warmup_ratio=1.0 is out of range [0, 1)"),
    ("train.epochs=0", "train.epochs=0 is out of range (0, inf)"),
    ("sampling.top_k=-1", "sampling.top_k=-1 is out of range [0, inf)"),
    ("train.learning_rate=.nan", "train.learning_rate=nan is out of range (0, inf)"),
    ("data.num_eval_prompts=0", "data.num_eval_prompts=0 is out of range (0, inf)"),
    ("loss.beta=0", "loss.beta=0.0 is out of range (0, inf)"),  # every loss flat; IPO ÷ 0
])
def test_out_of_range(override, message):
    assert _error([override]) == message


def test_boundaries_inside_the_range_are_accepted():
    cfg = load_config(None, ["optune.rho=1", "train.warmup_ratio=0", "eval.examples=0"])
    assert (cfg.optune.rho, cfg.train.warmup_ratio, cfg.eval.examples) == (1.0, 0.0, 0)


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=sgd", "train.optimizer='sgd' is not one of: rmsprop, adamw"),
    ("optune.rank_key=max", "optune.rank_key='max' is not one of: chosen, mean, rejected"),
    ("model.remat=some", "model.remat='some' is not one of: none, full, dots, dots_no_batch"),
])
def test_choices_are_listed(override, message):
    assert _error([override]) == message


def test_micro_batch_must_divide_batch():
    message = "train.micro_batch_size=3 must divide train.batch_size=8"
    assert _error(["train.micro_batch_size=3"]) == message
    with pytest.raises(ConfigError, match="must divide"):
        TrainSection(batch_size=8, micro_batch_size=3)
    cfg = load_config(None, ["train.batch_size=12", "train.micro_batch_size=4"])
    assert (cfg.train.batch_size, cfg.train.micro_batch_size) == (12, 4)


def test_file_errors(tmp_path):
    assert _error([], tmp_path / "nope.yaml") == f"config file not found: {tmp_path / 'nope.yaml'}"
    bad = _write(tmp_path, "optune:\n  rho: [0.5\n")
    assert _error([], bad).startswith(f"cannot parse config file {bad}: ")
    assert "line" in _error([], bad)
    listing = _write(tmp_path, "- a\n- b\n")
    assert _error([], listing) == f"config file {listing} must hold a mapping of sections, got list"
    # issue 20, case 8: an empty file (or only comments) does not start the default job
    empty = _write(tmp_path, "")
    assert _error([], empty) == (
        f"config file {empty} is empty; give at least one section (an empty mapping `{{}}` runs "
        "every default)"
    )
    assert _error([], _write(tmp_path, "# rho: 0.5\n")).startswith(f"config file {empty} is empty")
    assert load_config(_write(tmp_path, "{}\n"), []) == RunConfig()
    assert _error([], tmp_path) == f"config file {tmp_path} is a directory"
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"optune: {rho: 0.5}\n\xff\n")
    assert _error([], binary) == (
        f"cannot read config file {binary}: not UTF-8 text (byte 0xff at offset 19)"
    )


def test_override_errors():
    assert _error(["optune.rho"]) == "override 'optune.rho' must look like section.key=value"
    assert _error(["optune.rho=[0.5"]).startswith("cannot parse override 'optune.rho=[0.5': ")


def test_describe_options_lists_every_key():
    text = describe_options()
    lines = text.splitlines()
    leaves = 0
    for section in dataclasses.fields(RunConfig):
        for f in dataclasses.fields(section.default_factory()):
            sub = getattr(section.default_factory(), f.name)
            leaves += len(dataclasses.fields(sub)) if dataclasses.is_dataclass(sub) else 1
    assert len(lines) == leaves
    rho = next(line for line in lines if line.split()[0] == "optune.rho")
    assert "float" in rho and "0.5" in rho and "(0, 1]" in rho
    opt = next(line for line in lines if line.split()[0] == "train.optimizer")
    assert "one of: rmsprop, adamw" in opt
    assert any(line.split()[0] == "model.random.sliding_window" for line in lines)
