import pytest

from diffusion_from_scratch.cli import InputError, config_from_constants

CONSTANTS = {"preset": "a", "lr": 0.1, "epochs": 3, "name": "x", "flag": False}
PRESETS = {"a": {}, "b": {"lr": 0.5, "epochs": 7}}


def test_defaults_presets_and_flags_in_that_order():
    assert config_from_constants(CONSTANTS, PRESETS, [])["lr"] == 0.1
    cfg = config_from_constants(CONSTANTS, PRESETS, ["--preset", "b", "--epochs", "9", "--flag", "true"])
    assert (cfg["lr"], cfg["epochs"], cfg["flag"], cfg["preset"]) == (0.5, 9, True, "b")


def test_types_come_from_the_defaults():
    cfg = config_from_constants(CONSTANTS, PRESETS, ["--lr", "1e-3", "--name", "y"])
    assert cfg["lr"] == pytest.approx(1e-3) and isinstance(cfg["lr"], float) and cfg["name"] == "y"


@pytest.mark.parametrize("argv", [["--epochs", "2.5"], ["--lr", "abc"], ["--unknown", "1"], ["--preset", "zz"],
                                  ["--flag", "maybe"]])
def test_bad_flags_raise_input_error(argv):
    with pytest.raises(InputError):
        config_from_constants(CONSTANTS, PRESETS, argv)


def test_explicit_flags_are_reported():
    _, explicit = config_from_constants(CONSTANTS, PRESETS, ["--epochs", "2"], return_explicit=True)
    assert explicit == {"epochs"}


def test_choices_are_enforced():
    with pytest.raises(InputError, match="invalid choice"):
        config_from_constants(CONSTANTS, PRESETS, ["--name", "z"], choices={"name": ("x", "y")})
