"""Run configuration: presets, canonical arms, validation, files, the evaluation schedule."""

import pytest
from pydantic import ValidationError

from objective_server.objectives.presets import preset
from objective_server.runs import RunConfig, evaluation_schedule, load_run_configs, preset_run_files


def test_a_preset_expands_into_named_arms_sized_for_the_row():
    config = RunConfig.model_validate({"name": "r", "preset": "ul2", "seq_len": 512})
    assert config.names == [o.name for o, _ in preset("ul2", seq_len=512)]
    assert sum(config.initial_probabilities) == pytest.approx(1.0)
    # The stored form is self-contained: it round-trips without consulting the preset again.
    assert RunConfig.model_validate(config.stored()) == config


def test_arms_are_canonicalised_from_dicts_and_names():
    spec = {"family": "infilling", "mean_span": 3, "rate": 0.15, "length": 512}
    a = RunConfig.model_validate({"name": "a", "arms": [{"objective": spec, "probability": 2}]})
    b = RunConfig.model_validate({"name": "b", "arms": [{"objective": "infilling.span3.mask15.len512", "probability": 1}]})
    assert a.names == b.names == ["infilling.span3.mask15.len512"]
    assert a.initial_probabilities == [1.0]


@pytest.mark.parametrize("bad", [
    {"name": "x"},                                                    # neither arms nor preset
    {"name": "x", "preset": "nope"},                                  # unknown preset
    {"name": "x", "preset": {"name": "ul2"}},                         # wrong type (once a 500: TypeError)
    {"name": "x", "preset": "ul2", "seq_len": "2048x"},
    {"name": "x", "preset": "ul2", "seq_len": 10**30},
    {"name": "x", "preset": "ul2", "seq_len": 32},
    {"name": "bad name!", "preset": "ul2"},
    {"name": "x", "arms": [{"objective": "copying.len64", "probability": 0}]},
    {"name": "x", "arms": [{"objective": "copying.len64", "probability": 1}] * 2},
    {"name": "x", "arms": [{"objective": "copying.len64", "probability": -1}]},
    {"name": "x", "arms": [{"objective": "teleport.len64", "probability": 1}]},
    {"name": "x", "preset": "ul2", "eval_steps": [5, 5]},
    {"name": "x", "preset": "ul2", "eval_steps": [0, 3]},
    {"name": "x", "preset": "ul2", "surprise": 1},
])
def test_bad_configs_are_validation_errors(bad):
    with pytest.raises(ValidationError):
        RunConfig.model_validate(bad)


def test_an_arm_that_cannot_fit_the_row_is_refused_with_the_seq_len_it_needs():
    def config(seq_len, *objectives):
        arms = [{"objective": o, "probability": 1} for o in ("copying.len64", *objectives)]
        return RunConfig.model_validate({"name": "x", "seq_len": seq_len, "arms": arms})

    # Four queries of at most 3 + 2 * 8 + 1 + 32 positions each, two markers and an 8-token context.
    selective = "selective_copying.spans4.after.len384"
    with pytest.raises(ValidationError, match=f"objective '{selective}' cannot build an example in a row "
                                              "of seq_len 217: it needs seq_len >= 218"):
        config(217, selective)
    assert config(218, selective).names == ["copying.len64", selective]
    with pytest.raises(ValidationError, match="it needs more than seq_len 131072"):
        config(2048, "selective_copying.spans1.after.span4to200000.len64")


def test_files_in_yaml_and_toml_with_one_run_or_a_list(tmp_path):
    (tmp_path / "one.yaml").write_text("name: a\npreset: ntp\nseq_len: 256\n")
    (tmp_path / "many.toml").write_text('[[runs]]\nname = "b"\npreset = "ul2"\n\n[[runs]]\nname = "c"\npreset = "ntp"\n')
    assert [c.name for c in load_run_configs(tmp_path / "one.yaml")] == ["a"]
    assert [c.name for c in load_run_configs(tmp_path / "many.toml")] == ["b", "c"]
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match="yaml"):
        load_run_configs(tmp_path / "x.json")


def test_every_shipped_preset_run_file_loads():
    files = preset_run_files()
    assert set(files) == {"birdie", "ul2", "decoder-ul2", "ntp"}
    for name, path in files.items():
        (config,) = load_run_configs(path)
        assert config.name == name


def test_long_runs_use_the_papers_evaluation_steps_and_short_runs_a_scaled_distinct_schedule():
    assert evaluation_schedule(20_000)[:9] == [10, 50, 250, 500, 1000, 1500, 2000, 3000, 4000]
    assert evaluation_schedule(20_000)[-1] == 20_000
    short = evaluation_schedule(240)
    assert short == sorted(set(short)) and short[0] >= 1 and short[-1] <= 240 and len(short) >= 5
