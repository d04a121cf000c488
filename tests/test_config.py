"""Config: defaults, YAML + dotted overrides, errors that name the key, and every shipped recipe."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import yaml

from spaceft.cli import shipped_recipes
from spaceft.configfile import config_from_dict, load_config, parse_overrides
from spaceft.losses import LossType

MIN = {"data": {"train": "x.jsonl"}}


def test_defaults_follow_the_seed_and_spin() -> None:
    cfg = config_from_dict(MIN)
    assert cfg.train.loss is LossType.SPACE
    assert cfg.train.mu == 1.0 and cfg.train.optimizer == "rmsprop"
    assert cfg.train.global_batch_size == 64 and cfg.train.epochs == 2
    # the user's lr holds for every iteration unless the recipe asks for a switch (issue 9)
    assert cfg.train.lr_after is None
    assert [cfg.train.lr_for(t) for t in range(4)] == [5e-7] * 4
    spin = config_from_dict({**MIN, "train": {"lr_after": 1e-7}})  # SPIN's schedule, stated
    assert [spin.train.lr_for(t) for t in range(4)] == [5e-7, 5e-7, 1e-7, 1e-7]


def test_tspin_defaults_are_the_papers() -> None:
    """arXiv 2601.08198, Sec. 4.3: α = 1 (train.beta's default), β = 0.1 from iteration 1 on (0 in 0)."""
    cfg = config_from_dict({**MIN, "train": {"loss": "tspin"}})
    assert cfg.train.loss is LossType.TSPIN and not cfg.train.loss.needs_opponent
    assert cfg.train.beta is None and cfg.train.loss.default_beta == 1.0
    assert [cfg.train.history_weight_for(t) for t in range(3)] == [0.0, 0.1, 0.1]
    late = config_from_dict({**MIN, "train": {"loss": "tspin", "history_start_iteration": 2}})
    assert [late.train.history_weight_for(t) for t in range(3)] == [0.0, 0.0, 0.1]
    # T-SPIN samples like S-SimPO: no opponent density, so tempered decoding is not refused
    config_from_dict({**MIN, "train": {"loss": "tspin"}, "generation": {"temperature": 0.7}})


def test_overrides_are_typed_and_nested() -> None:
    assert parse_overrides(["train.lr=1e-7", "model.name=gpt2", "eval.lm_eval_tasks=[a, b]"]) == {
        "train": {"lr": "1e-7"},  # YAML 1.1 scalar; the dataclass field's type coerces it
        "model": {"name": "gpt2"},
        "eval": {"lm_eval_tasks": ["a", "b"]},
    }


def test_recipe_plus_overrides(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "x", "data": {"train": "t.jsonl"}, "train": {"lr": "5e-7"}}))
    cfg = load_config(recipe, ["train.loss=spin", "selfplay.iterations=5"])
    assert cfg.train.lr == 5e-7  # YAML 1.1 reads 5e-7 as a string; it is coerced
    assert cfg.train.loss is LossType.SPIN and cfg.selfplay.iterations == 5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lrr=1"], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
        (["bogus.x=1"], "unknown config key 'bogus'"),
        (["train.epochs=two"], "train.epochs: expected an integer"),
        (["train.loss=dpo"], "train.loss: unknown loss 'dpo'"),
        (["train.mu=0"], "train.mu must be > 0"),
        (["train.global_batch_size=10", "train.micro_batch_size=4"], "must be a multiple"),
        (["generation.temperature=0", "generation.num_samples=2"], "greedy"),
        (["data.overlong=cut"], "data.overlong"),
        (["logging.report_to=mlflow"], "logging.report_to"),
        (["logging.log_every=0"], "logging.log_every"),
        (["train.tau=0"], "train.tau"),
        (["train.history_weight=-0.1"], "train.history_weight"),
        (["train.history_weight=nan"], "train.history_weight must be a finite number"),
        (["train.save_every=-1"], "train.save_every"),
        (["model.dtype=float16"], "model.dtype=float16 would train float16 weights"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=None) as err:
        load_config(None, ["data.train=x.jsonl", *overrides])
    assert message in str(err.value)


def test_a_recipe_that_is_not_yaml_is_named_with_its_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: x\n train:\n  lr: 1e-5\n")  # train: indented by one space
    with pytest.raises(ValueError) as err:
        load_config(bad)
    problem = "expected <block end>, but found '<block mapping start>'"
    assert str(err.value) == f"{bad}:3:2: not valid YAML: {problem}"


def test_train_data_is_required() -> None:
    with pytest.raises(ValueError, match=r"data\.train is required"):
        config_from_dict({})


def test_fingerprint_tracks_results_not_iterations() -> None:
    a = config_from_dict(MIN)
    b = config_from_dict({**MIN, "selfplay": {"iterations": 9}, "eval": {"max_new_tokens": 3}})
    c = config_from_dict({**MIN, "train": {"lr": 1e-6}})
    assert a.training_fingerprint() == b.training_fingerprint()
    assert a.eval_fingerprint() != b.eval_fingerprint()
    assert a.training_fingerprint() != c.training_fingerprint()
    d = config_from_dict({"data": {"train": "x.jsonl", "eval": "held_out.jsonl", "eval_size": 10}})
    assert a.training_fingerprint() == d.training_fingerprint()  # a new held-out set re-runs evals only
    assert a.eval_fingerprint() != d.eval_fingerprint()


def test_resolved_config_round_trips() -> None:
    cfg = config_from_dict({**MIN, "train": {"loss": "ipo"}})
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("name", shipped_recipes())
def test_every_shipped_recipe_validates(name: str) -> None:
    path = Path(str(resources.files("spaceft.recipes") / f"{name}.yaml"))
    text = path.read_text()
    header = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{name}.yaml must start with a comment showing how to run it"
    assert f"run {name}" in "\n".join(header), f"{name}.yaml's header must show the command that runs it"
    cfg = load_config(path)
    assert cfg.data.train


def test_shipped_recipes_cover_the_baselines() -> None:
    losses = {load_config(Path(str(resources.files("spaceft.recipes") / f"{n}.yaml"))).train.loss
              for n in shipped_recipes()}  # fmt: skip
    assert {LossType.SPACE, LossType.SPIN, LossType.SFT} <= losses


def test_lab_subcommand_is_routed_even_after_global_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from spaceft.cli import main

    for argv in (["lab", "--help"], ["-q", "lab", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        assert "usage: spaceft lab" in capsys.readouterr().out


@pytest.mark.parametrize(
    "decoding", [["generation.temperature=0.7"], ["generation.top_p=0.9"], ["generation.top_k=50"]]
)
def test_decoding_that_changes_the_noise_distribution_is_refused(decoding: list[str]) -> None:
    """SPACE, SPIN and S-IPO use the opponent's untempered log-probs as the samples' density."""
    for loss in ("space", "spin", "ipo"):
        with pytest.raises(ValueError, match=r"allow_biased_sampling=true") as err:
            load_config(None, ["data.train=x.jsonl", f"train.loss={loss}", *decoding])
        assert "untempered" in str(err.value)
    # reference-free S-SimPO and SFT make no such assumption; an explicit opt-in is recorded
    for loss in ("simpo", "sft"):
        load_config(None, ["data.train=x.jsonl", f"train.loss={loss}", *decoding])
    cfg = load_config(None, ["data.train=x.jsonl", "generation.allow_biased_sampling=true", *decoding])
    assert cfg.to_dict()["generation"]["allow_biased_sampling"] is True
    assert not cfg.generation.is_ancestral


@pytest.mark.parametrize("setting", ["selfplay.resample=false", "selfplay.mix_previous=true"])
def test_space_on_samples_of_another_model_is_refused(setting: str) -> None:
    """SPACE's noise density is the current opponent's: samples reused from iteration 0 or mixed in from
    the previous opponent come from another distribution, and the optimum moves off the real data."""
    with pytest.raises(ValueError, match=r"allow_biased_sampling=true") as err:
        load_config(None, ["data.train=x.jsonl", setting])
    assert setting.split("=")[0] in str(err.value) and "p_data * p_opponent / q" in str(err.value)
    for loss in ("spin", "ipo", "simpo"):  # SPIN's data mixing is SPIN's own practice
        load_config(None, ["data.train=x.jsonl", f"train.loss={loss}", setting])
    load_config(None, ["data.train=x.jsonl", setting, "selfplay.iterations=1"])  # only its own samples
    cfg = load_config(None, ["data.train=x.jsonl", setting, "generation.allow_biased_sampling=true"])
    assert cfg.generation.allow_biased_sampling and cfg.generation.is_ancestral


def test_negative_top_k_is_refused() -> None:
    with pytest.raises(ValueError, match=r"generation\.top_k must be >= 0"):
        load_config(None, ["data.train=x.jsonl", "generation.top_k=-5"])


def test_lora_dropout_is_refused_where_rewards_compare_with_the_opponent() -> None:
    message = r"model\.lora\.dropout=0\.1: the space loss .* set model\.lora\.dropout=0"
    with pytest.raises(ValueError, match=message):
        load_config(None, ["data.train=x.jsonl", "model.lora.r=8", "model.lora.dropout=0.1"])
    load_config(None, ["data.train=x.jsonl", "model.lora.r=8", "model.lora.dropout=0.1", "train.loss=sft"])


def test_a_shipped_recipe_loads_by_name_and_a_file_wins(tmp_path, monkeypatch) -> None:
    from spaceft.configfile import load_config

    assert load_config("demo").name == "demo-space"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").write_text("name: mine\ndata: {train: builtin:arithmetic}\n")
    assert load_config("demo").name == "mine"
    with pytest.raises(FileNotFoundError, match="recipe not found: nope"):
        load_config("nope")


def test_float16_is_allowed_with_lora() -> None:
    """peft keeps LoRA adapters (the only trained weights) in float32 over a float16 base."""
    cfg = load_config(None, ["data.train=x.jsonl", "model.dtype=float16", "model.lora.r=8"])
    assert cfg.model.dtype == "float16" and cfg.model.lora.r == 8


def test_keys_added_later_leave_fingerprints_of_runs_at_their_defaults_alone() -> None:
    """`data.subset` came after runs (and the evidence grid's adoptions) recorded their fingerprints: at
    its default it must not enter them; a random draw must."""
    from spaceft.configfile import config_from_dict
    from spaceft.fingerprint import eval_view, training_view

    cfg = config_from_dict({"data": {"train": "builtin:arithmetic"}})
    before = cfg.to_dict()
    before["data"].pop("subset")  # the dict an older spaceft wrote
    assert training_view(cfg.to_dict()) == training_view(before)
    assert eval_view(cfg.to_dict()) == eval_view(before)
    before["train"].pop("history_weight"), before["train"].pop("history_start_iteration")
    assert training_view(cfg.to_dict()) == training_view(before)
    tspin = config_from_dict({"data": {"train": "builtin:arithmetic"}, "train": {"history_weight": 0.3}})
    assert tspin.training_fingerprint() != cfg.training_fingerprint()
    drawn = config_from_dict({"data": {"train": "x.jsonl", "subset": "random", "eval_size": 5}})
    first = config_from_dict({"data": {"train": "x.jsonl", "eval_size": 5}})
    assert drawn.training_fingerprint() != first.training_fingerprint()
    assert drawn.eval_fingerprint() != first.eval_fingerprint()


def test_settings_read_as_typed_where_yaml_11_would_read_a_boolean(tmp_path: Path) -> None:
    """YAML 1.1 reads no / off / yes / on as booleans: `mixed_precision: no` became False and was refused
    ("expected a string, got False"). A string setting keeps the word; a boolean one reads it as one."""
    cfg = load_config("tiny", ["train.mixed_precision=no", "eval.lm_eval_chat_template=off"])
    assert cfg.train.mixed_precision == "no" and cfg.eval.lm_eval_chat_template == "off"
    recipe = tmp_path / "r.yaml"  # mixed_precision: a string setting; enabled, progress: boolean ones
    recipe.write_text("base: tiny\ntrain: {mixed_precision: no}\neval: {enabled: no}\n"
                      "logging: {progress: Off}\n")  # fmt: skip
    cfg = load_config(recipe)
    assert cfg.train.mixed_precision == "no" and cfg.eval.enabled is False and cfg.logging.progress is False
    on = load_config("tiny", ["eval.enabled=yes", "logging.progress=true", "eval.lm_eval_chat_template=on"])
    assert on.eval.enabled is True and on.logging.progress is True and on.eval.lm_eval_chat_template == "on"
    with pytest.raises(ValueError, match=r"logging\.progress: expected true or false, got 'maybe'"):
        load_config("tiny", ["logging.progress=maybe"])
    with pytest.raises(ValueError, match=r"train\.mixed_precision must be 'no' or 'bf16', got 'off'"):
        load_config("tiny", ["train.mixed_precision=off"])


def test_the_old_chunked_logps_key_is_read_as_logps_path_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Recipes and recorded configs from before `train.logps_path` set `train.chunked_logps`: true is the
    chunked path, false the logits path; the fingerprint of the default stays that of chunked_logps: true
    (what every recorded run holds), so their adoptions and resume checks are unchanged."""
    from spaceft.fingerprint import training_view

    assert config_from_dict(MIN).train.logps_path == "auto"
    with caplog.at_level("WARNING", logger="spaceft.configfile"):
        on = load_config(None, ["data.train=x.jsonl", "train.chunked_logps=true"])
        off = config_from_dict({**MIN, "train": {"chunked_logps": False}})
    assert (on.train.logps_path, off.train.logps_path) == ("chunked", "logits")
    assert caplog.text.count("train.chunked_logps is deprecated") == 2
    with pytest.raises(ValueError, match=r"keep only train\.logps_path"):
        config_from_dict({**MIN, "train": {"chunked_logps": True, "logps_path": "auto"}})
    with pytest.raises(ValueError, match="expected true or false"):
        config_from_dict({**MIN, "train": {"chunked_logps": "maybe"}})
    with pytest.raises(ValueError, match=r"train\.logps_path must be one of auto, chunked, logits"):
        config_from_dict({**MIN, "train": {"logps_path": "fast"}})
    recorded = config_from_dict(MIN).to_dict()
    recorded["train"].pop("logps_path")
    recorded["train"]["chunked_logps"] = True  # the dict an older spaceft wrote
    assert training_view(config_from_dict(MIN).to_dict()) == training_view(recorded)
    assert on.training_fingerprint() == config_from_dict(MIN).training_fingerprint()
    assert off.training_fingerprint() != on.training_fingerprint()
