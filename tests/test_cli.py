import pytest

from bias_begets_bias.cli import InputError, config_from_constants

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


# ----------------------------------------------------------------------------- declared ranges (issue 11)
import math  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from bias_begets_bias.cli import (Range, check_ranges, constants_of, parse_number_list,  # noqa: E402
                                        parse_range)


@pytest.mark.parametrize("comment, expected", [
    ("# [0, 1) EMA decay", Range(0, 1, True, False)),
    ("[1, inf) images per class", Range(1, math.inf, True, False)),
    ("(0, inf) learning rate", Range(0, math.inf, False, False)),
    ("[0, 1] share", Range(0, 1, True, True)),
    ("(-inf, inf) any finite number", Range(-math.inf, math.inf, False, False)),
    ("[0, 2**32) seed", Range(0, 2 ** 32, True, False)),
    ("[-1, inf) -1 = default", Range(-1, math.inf, True, False)),
    ("[1e-3, 0.5] small", Range(0.001, 0.5, True, True)),
    ("list of ints in [1, inf): k values", Range(1, math.inf, True, False, "ints")),
    ("list of numbers in (0, inf): scales", Range(0, math.inf, False, False, "numbers")),
])
def test_a_declared_range_is_parsed_from_the_start_of_a_comment(comment, expected):
    assert parse_range(comment) == expected


@pytest.mark.parametrize("comment", ["(0 = off) threshold", "images per class", "[0, 1 missing bracket",
                                     "see [0, 1) later", "list of words in [0, 1)", ""])
def test_comments_without_a_leading_range_declare_none(comment):
    assert parse_range(comment) is None


def test_range_membership_and_text():
    unit = Range(0, 1, True, False)
    assert unit.contains(0) and unit.contains(0.999) and not unit.contains(1) and not unit.contains(-0.1)
    assert not unit.contains(math.nan) and not Range(-math.inf, math.inf, False, False).contains(math.inf)
    assert Range(0, 1, True, True).contains(1) and not Range(0, math.inf, False, False).contains(0)
    assert str(unit) == "[0, 1)" and str(Range(0, 2 ** 32)) == "[0, 2**32)"
    assert str(Range(0, math.inf, False, False)) == "(0, inf)"


def test_ranges_are_read_from_the_module_that_defines_each_constant(tmp_path, monkeypatch):
    (tmp_path / "i11_flags.py").write_text(textwrap.dedent('''
        SHARED = 3  # [1, 10] a shared count
        UNDECLARED_IMPORTED = 7
        NAME = "x"  # a string
    '''))
    (tmp_path / "i11_code.py").write_text(textwrap.dedent('''
        FEMALE = "woman"  # a word the code uses, not a setting
        LIMIT = 5  # [1, inf) a ranged number of a module that is not a flag module
    '''))
    (tmp_path / "script_i11.py").write_text(textwrap.dedent('''
        from i11_flags import SHARED, UNDECLARED_IMPORTED, NAME
        from i11_code import FEMALE, LIMIT
        BETA = 0.5  # [0, 1) a probability
        K_LIST = "5,20"  # list of ints in [1, inf): ks
        PLAIN = 4  # no range
        LOCAL_LIMIT = LIMIT  # [1, inf) a flag whose default comes from code
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import script_i11

    constants = constants_of(vars(script_i11))
    # the undeclared number of the flag module and everything of the code module are code, not flags
    assert set(constants) == {"shared", "name", "beta", "k_list", "plain", "local_limit"}
    assert constants["local_limit"] == 5
    assert constants.ranges == {"shared": Range(1, 10, True, True), "beta": Range(0, 1),
                                "k_list": Range(1, math.inf, True, False, "ints"), "local_limit": Range(1, math.inf)}
    for name in ("script_i11", "i11_flags", "i11_code"):
        sys.modules.pop(name, None)


def test_check_ranges_refuses_with_one_clear_message():
    ranges = {"ema_beta": Range(0, 1), "steps": Range(1, math.inf), "k_list": Range(1, math.inf, items="ints"),
              "words": Range(1, math.inf, items="ints")}
    check_ranges({"ema_beta": 0.5, "steps": 3, "k_list": "5,20", "words": ""}, ranges, {"words": ""})
    with pytest.raises(InputError, match=r"^--ema_beta: expected a value in \[0, 1\), got 2$"):
        check_ranges({"ema_beta": 2.0}, ranges)
    with pytest.raises(InputError, match=r"^--steps: expected a value in \[1, inf\), got 0$"):
        check_ranges({"steps": 0}, ranges)
    with pytest.raises(InputError, match=r"--k_list: .*item 2, 0, is outside \[1, inf\)"):
        check_ranges({"k_list": "5,0"}, ranges)
    with pytest.raises(InputError, match="--k_list"):  # empty where the default is not
        check_ranges({"k_list": ""}, ranges, {"k_list": "5,20"})


@pytest.mark.parametrize("text, kind, message", [
    ("", float, r"got ''$"), ("1,,3", float, "item 2 is empty"), ("1,x", float, "'x', is not a number"),
    ("1,nan", float, "'nan', is not a finite number"), ("inf", float, "not a finite number"),
    ("1.5", int, "'1.5', is not an integer"), ("2, 0", int, "item 2, 0, is outside"),
])
def test_list_flags_refuse_empty_items_non_numbers_and_non_finite_values(text, kind, message):
    with pytest.raises(InputError, match=message) as error:
        parse_number_list(text, "guidance", kind, Range(1, math.inf))
    assert str(error.value).startswith("--guidance: expected a comma-separated list of ")


def test_list_flags_keep_order_and_type():
    assert parse_number_list(" 1, 3 ,2", "g") == [1.0, 3.0, 2.0]
    assert parse_number_list("5,20,5", "k", int) == [5, 20, 5]


def test_float_flags_are_always_finite_and_ranges_apply_to_presets_too():
    constants = constants_of({"LR": 0.1, "EPOCHS": 3})  # no source file: no declared ranges
    for argv in (["--lr", "nan"], ["--lr", "inf"], ["--lr=-inf"]):
        with pytest.raises(InputError, match="--lr: expected a finite number"):
            config_from_constants(constants, None, argv)
    constants.ranges = {"epochs": Range(1, math.inf)}
    with pytest.raises(InputError, match="--epochs: expected a value in"):
        config_from_constants(constants, {"bad": {"epochs": 0}}, ["--preset", "bad"])


SCRIPTS = ["diffusion_from_scratch.synthetic_data", "diffusion_from_scratch.ddpm_conditional",
           "diffusion_from_scratch.fidelity", "statistical_auditing.audit", "statistical_auditing.fairface",
           "statistical_auditing.diffusion_classifier", "statistical_auditing.diff_prompts_same_score",
           "statistical_auditing.real_prompts_proportion", "statistical_auditing.combine_audits",
           "statistical_auditing.dose_response", "statistical_auditing.lipschitz", "statistical_auditing.experiment",
           "bench.scoredecomp_vs_elbo", "bench.sd_time_per_image", "bench.simplex_vs_cvxpy", "bench.train_throughput"]


@pytest.mark.parametrize("module_name", SCRIPTS)
def test_every_numeric_flag_of_every_script_declares_its_range_and_the_defaults_obey_it(module_name):
    import importlib

    module = importlib.import_module(module_name)
    constants = constants_of(vars(module))
    numeric = [k for k, v in constants.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert numeric and not [k for k in numeric if k not in constants.ranges]
    check_ranges(constants, constants.ranges, constants)  # the defaults
    for preset in getattr(module, "PRESETS", {}).values():  # and every preset
        check_ranges(dict(constants) | preset, constants.ranges, constants)


@pytest.mark.parametrize("module_name", SCRIPTS)
def test_every_flag_of_every_script_is_a_setting_it_reads(module_name):
    """A flag is a constant the script assigns, or one of a shared flag module (``*_flags``);
    an imported code constant (dose_response once took --female_word and ignored it) is not."""
    import importlib

    from bias_begets_bias.cli import _declarations

    module = importlib.import_module(module_name)
    _, imports, assigned = _declarations(module.__file__)
    stray = [k for k in constants_of(vars(module))
             if k.upper() not in assigned and not imports[k.upper()][0].endswith("_flags")]
    assert not stray


def test_ctrl_c_says_what_the_script_says_and_exits_130(capsys):
    from bias_begets_bias.cli import run_main

    def interrupted():
        raise KeyboardInterrupt

    for message in (None, "interrupted: rerun with --resume true to continue"):
        with pytest.raises(SystemExit) as exit_info:
            run_main(interrupted) if message is None else run_main(interrupted, message)
        assert exit_info.value.code == 130
        assert capsys.readouterr().err == (message or "interrupted") + "\n"


def test_sigterm_ends_a_script_like_ctrl_c_and_the_handler_is_restored(capsys):
    import os
    import signal
    import time

    from bias_begets_bias.cli import run_main

    def killed():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this
        raise AssertionError("SIGTERM did not interrupt the script")

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exit_info:
        run_main(killed, "stopped: rerun to resume")
    assert exit_info.value.code == 130 and capsys.readouterr().err == "stopped: rerun to resume\n"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_file_the_machine_refuses_to_write_is_one_line_too(capsys):
    import errno

    from bias_begets_bias.cli import run_main

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/000001.png")

    with pytest.raises(SystemExit) as exit_info:
        run_main(disk_full)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: /data/out/000001.png: No space left on device"]

    def a_bug():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "x")

    with pytest.raises(FileNotFoundError):  # not an environment problem: a bug keeps its traceback
        run_main(a_bug)


def test_an_allocation_that_fails_is_one_line_but_other_runtime_errors_are_bugs(capsys):
    from bias_begets_bias.cli import run_main

    def too_big():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 400000000000 bytes.")

    with pytest.raises(SystemExit) as exit_info:
        run_main(too_big)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory (RuntimeError: [enforce fail")

    def a_bug():
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_main(a_bug)
