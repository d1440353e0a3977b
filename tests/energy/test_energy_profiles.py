"""Energy profiles: bundled figures against their sources, user TOML validation."""

import dataclasses

import pytest

import energy
from energy.profiles import EnergyProfile, available_profiles, get_profile, load_profile

VALID = """
name = "my_chip"
description = "test accelerator"
source = "bench measurement"
ac_pj = 1.5
mac_pj = 3
neuron_update_pj = 2.0
spike_pj = 0.5
weight_bits = 8
activation_bits = 1
"""


def test_cmos45_figures_are_horowitz_2014():
    fp32, fp16, int8 = get_profile("cmos45"), get_profile("cmos45_fp16"), get_profile("cmos45_int8")
    # Horowitz ISSCC 2014: fp32 add 0.9 / mult 3.7, fp16 0.4 / 1.1, int8 0.03 / 0.2.
    assert (fp32.ac_pj, fp32.mac_pj) == (0.9, pytest.approx(0.9 + 3.7))
    assert (fp16.ac_pj, fp16.mac_pj) == (0.4, pytest.approx(0.4 + 1.1))
    assert (int8.ac_pj, int8.mac_pj) == (0.03, pytest.approx(0.03 + 0.2))
    assert "Horowitz" in fp32.source and "ISSCC 2014" in fp32.source


def test_neuromorphic_profiles_carry_their_published_figures_and_sources():
    loihi, truenorth = get_profile("loihi"), get_profile("truenorth")
    assert (loihi.ac_pj, loihi.neuron_update_pj) == (23.6, 52.0)
    assert "Davies" in loihi.source and "2018" in loihi.source
    assert truenorth.ac_pj == 26.0 and "Merolla" in truenorth.source
    assert "Hoeppner" in get_profile("spinnaker2").source


def test_every_bundled_profile_is_documented_and_uses_cmos45_for_the_ann_baselines():
    names = available_profiles()
    assert {"cmos45", "cmos45_fp16", "cmos45_int8", "loihi", "truenorth", "spinnaker2"} <= set(
        names
    )
    for name in names:
        p = get_profile(name)
        assert p.name == name and p.description and p.source and p.note
        assert (p.ann_mac_fp32_pj, p.ann_mac_int8_pj) == (4.6, 0.23)


def test_profiles_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_profile("cmos45").ac_pj = 0.1


def test_unknown_profile_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown energy profile 'loihi3'.*'cmos45'.*'truenorth'"):
        get_profile("loihi3")


def test_load_valid_user_profile(tmp_path):
    path = tmp_path / "chip.toml"
    path.write_text(VALID)
    p = load_profile(path)
    assert p == EnergyProfile(
        name="my_chip",
        description="test accelerator",
        source="bench measurement",
        ac_pj=1.5,
        mac_pj=3,
        neuron_update_pj=2.0,
        spike_pj=0.5,
        weight_bits=8,
        activation_bits=1,
    )
    assert energy.load_profile is load_profile


@pytest.mark.parametrize(
    "edit, error, message",
    [
        (lambda t: t.replace("ac_pj = 1.5\n", ""), ValueError, "missing required field 'ac_pj'"),
        (
            lambda t: t.replace("mac_pj = 3", 'mac_pj = "3"'),
            TypeError,
            "field 'mac_pj' must be a number",
        ),
        (
            lambda t: t.replace("spike_pj = 0.5", "spike_pj = -0.5"),
            ValueError,
            "field 'spike_pj' must be a finite number >= 0",
        ),
        (lambda t: t + "sop_pj = 1.0\n", ValueError, r"unknown field\(s\) \['sop_pj'\]"),
        (
            lambda t: t.replace('name = "my_chip"', "name = 3"),
            TypeError,
            "field 'name' must be a string",
        ),
        (
            lambda t: t.replace("ac_pj = 1.5", "ac_pj = true"),
            TypeError,
            "field 'ac_pj' must be a number",
        ),
        (
            lambda t: t.replace("ac_pj = 1.5", "ac_pj = nan"),
            ValueError,
            "field 'ac_pj' must be a finite",
        ),
        (lambda t: t.replace("ac_pj = 1.5", "ac_pj = "), ValueError, "not valid TOML"),
        (
            lambda t: t.replace("weight_bits = 8\n", ""),
            ValueError,
            "missing required field 'weight_bits'",
        ),
        (
            lambda t: t.replace("activation_bits = 1\n", ""),
            ValueError,
            "missing required field 'activation_bits'",
        ),
        (
            lambda t: t.replace("weight_bits = 8", "weight_bits = 8.5"),
            TypeError,
            "field 'weight_bits' must be an integer",
        ),
        (
            lambda t: t.replace("weight_bits = 8", "weight_bits = true"),
            TypeError,
            "field 'weight_bits' must be an integer",
        ),
        (
            lambda t: t.replace("activation_bits = 1", "activation_bits = 0"),
            ValueError,
            "field 'activation_bits' must be between 1 and 64",
        ),
        (
            lambda t: t.replace("weight_bits = 8", "weight_bits = 65"),
            ValueError,
            "field 'weight_bits' must be between 1 and 64",
        ),
    ],
)
def test_malformed_user_profile_names_the_field(tmp_path, edit, error, message):
    path = tmp_path / "bad.toml"
    path.write_text(edit(VALID))
    with pytest.raises(error, match=message) as info:
        load_profile(path)
    assert "bad.toml" in str(info.value)


def test_profile_round_trips_through_a_dict():
    p = get_profile("loihi")
    assert EnergyProfile.from_dict(dataclasses.asdict(p)) == p
