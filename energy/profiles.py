"""Hardware energy profiles: picojoules per operation, each with its published source.

A profile prices the operations that :func:`energy.count_operations` counts:

- ``ac_pj``: one accumulate, a binary input event reaching one synapse (synaptic operation);
- ``mac_pj``: one multiply-accumulate, a graded (non-binary) input reaching one synapse;
- ``neuron_update_pj``: one neuron for one time step;
- ``spike_pj``: one emitted spike (reset and routing), 0 when a chip folds it into the above;
- ``memory_read_pj`` / ``memory_write_pj``: one memory access (the memory term: every report
  carries a compute-only and a compute + memory total, see :mod:`energy.report`; 0 on chips
  whose per-op figures already include memory);
- ``weight_bits`` / ``activation_bits``: the precision the prices hold for. ``weight_bits`` is
  the width of one stored synaptic weight; ``activation_bits`` that of one input the AC/MAC
  prices consume (1 on chips that carry binary spikes; graded inputs, MACs, run on a
  conventional host at fp32 there, see each ``note``). A report compares ``weight_bits`` with
  the precision the counted model ran at, so an fp32 accuracy is not quoted beside an 8-bit
  energy without saying so;
- ``ann_mac_fp32_pj`` / ``ann_mac_int8_pj``: the MAC of the ANN baselines. Every bundled
  profile takes them from ``cmos45`` fp32/int8 (Horowitz 2014) because the ANN baseline is a
  conventional accelerator, not the neuromorphic chip; a user profile may set its own.

Bundled profiles (``profiles.toml`` next to this file; :func:`available_profiles` lists them):
``cmos45`` (fp32), ``cmos45_fp16``, ``cmos45_int8`` (Horowitz ISSCC 2014), ``loihi`` (Davies
et al. 2018), ``truenorth`` (Merolla et al. 2014 / Akopyan et al. 2015) and ``spinnaker2``
(Hoeppner et al. 2021, indicative). Each profile's ``note`` states derivations and caveats.

A user profile is a TOML file with the same fields at top level, loaded by
:func:`load_profile`; validation errors name the field::

    name = "my_chip"
    description = "my accelerator, 22 nm"
    source = "internal measurement, 2025"
    ac_pj = 1.2
    mac_pj = 3.0
    neuron_update_pj = 2.0
    weight_bits = 8        # required: bits per stored weight
    activation_bits = 1    # required: bits per input event (1: binary spikes)
    # optional: spike_pj, memory_read_pj, memory_write_pj, ann_mac_fp32_pj, ann_mac_int8_pj, note

Example:
    >>> get_profile("cmos45").ac_pj
    0.9
    >>> get_profile("cmos45").mac_pj
    4.6
    >>> get_profile("cmos45_int8").weight_bits, get_profile("loihi").activation_bits
    (8, 1)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

__all__ = ["EnergyProfile", "available_profiles", "get_profile", "load_profile"]

_REQUIRED_NUMBERS = ("ac_pj", "mac_pj", "neuron_update_pj")
_OPTIONAL_NUMBERS = (
    "spike_pj",
    "memory_read_pj",
    "memory_write_pj",
    "ann_mac_fp32_pj",
    "ann_mac_int8_pj",
)
_REQUIRED_TEXT = ("name", "description", "source")
_REQUIRED_BITS = ("weight_bits", "activation_bits")
_MAX_BITS = 64


@dataclasses.dataclass(frozen=True)
class EnergyProfile:
    """Energy per operation of one hardware target, in picojoules, with its source.

    Attributes:
        name: short identifier, e.g. ``"cmos45"``.
        description: one line saying what hardware this is.
        source: citation every number can be traced to.
        ac_pj: accumulate (binary event x one synapse).
        mac_pj: multiply-accumulate (graded input x one synapse).
        neuron_update_pj: one neuron, one time step.
        spike_pj: one emitted spike.
        memory_read_pj: one memory read (memory term only).
        memory_write_pj: one memory write (memory term only).
        ann_mac_fp32_pj: MAC of the fp32 ANN baselines (default: cmos45 fp32, 4.6 pJ).
        ann_mac_int8_pj: MAC of the int8 ANN baselines (default: cmos45 int8, 0.23 pJ).
        weight_bits: bits of one stored synaptic weight the prices hold for (1 to 64).
            Required in TOML and in :meth:`from_dict`; the Python default, 32, is the
            precision the counting assumes (fp32), for profiles built in code.
        activation_bits: bits of one input an AC/MAC consumes (1: binary spikes; 1 to 64).
            Required and defaulted like ``weight_bits``.
        note: derivations and caveats.
    """

    name: str
    description: str
    source: str
    ac_pj: float
    mac_pj: float
    neuron_update_pj: float
    spike_pj: float = 0.0
    memory_read_pj: float = 0.0
    memory_write_pj: float = 0.0
    ann_mac_fp32_pj: float = 4.6
    ann_mac_int8_pj: float = 0.23
    weight_bits: int = 32
    activation_bits: int = 32
    note: str = ""

    def __post_init__(self):
        _validate(dataclasses.asdict(self), f"profile {self.name!r}")

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "profile") -> EnergyProfile:
        """Build a profile from a mapping, raising ValueError/TypeError that name the field.

        Args:
            data: field name -> value, as in the TOML format of the module docstring.
            where: prefix for error messages (a file name, a table name).
        """
        _validate(data, where)
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def _validate(data: Mapping, where: str) -> None:
    known = [f.name for f in dataclasses.fields(EnergyProfile)]
    if not isinstance(data, Mapping):
        raise TypeError(f"{where}: expected a table of fields, got {type(data).__name__}")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; valid fields: {known}")
    for field in _REQUIRED_TEXT + _REQUIRED_NUMBERS + _REQUIRED_BITS:
        if field not in data:
            raise ValueError(f"{where}: missing required field {field!r}")
    for field in (*_REQUIRED_TEXT, "note"):
        if field in data and not isinstance(data[field], str):
            raise TypeError(
                f"{where}: field {field!r} must be a string, got {type(data[field]).__name__}"
            )
    if not data["name"].strip():
        raise ValueError(f"{where}: field 'name' must not be empty")
    for field in _REQUIRED_NUMBERS + _OPTIONAL_NUMBERS:
        if field not in data:
            continue
        value = data[field]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                f"{where}: field {field!r} must be a number (picojoules), "
                f"got {type(value).__name__} {value!r}"
            )
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: field {field!r} must be a finite number >= 0, got {value}")
    for field in _REQUIRED_BITS:
        value = data[field]
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f"{where}: field {field!r} must be an integer number of bits, "
                f"got {type(value).__name__} {value!r}"
            )
        if not 1 <= value <= _MAX_BITS:
            raise ValueError(
                f"{where}: field {field!r} must be between 1 and {_MAX_BITS} bits, got {value}"
            )


def _toml_load(text: str, where: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                "reading TOML profiles on Python 3.10 needs the 'tomli' package"
            ) from err
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where}: not valid TOML: {err}") from err


def _bundled() -> dict[str, EnergyProfile]:
    # Parsed on each call: the file is tiny, and a module-level cache would be hidden state.
    text = resources.files(__package__).joinpath("profiles.toml").read_text(encoding="utf-8")
    tables = _toml_load(text, "bundled profiles.toml")
    return {
        name: EnergyProfile.from_dict({"name": name, **table}, f"bundled profile [{name}]")
        for name, table in tables.items()
    }


def available_profiles() -> list[str]:
    """Names of the bundled profiles, in file order.

    Returns:
        The names :func:`get_profile` accepts (the tables of ``profiles.toml``), e.g.
        ``["cmos45", "cmos45_fp16", ...]``.
    """
    return list(_bundled())


def get_profile(name: str | EnergyProfile) -> EnergyProfile:
    """Return a bundled profile by name (an :class:`EnergyProfile` passes through).

    Args:
        name: a bundled profile's name (one of :func:`available_profiles`), or an
            :class:`EnergyProfile`, returned as it is.

    Returns:
        The bundled :class:`EnergyProfile` called ``name`` (read afresh from
        ``profiles.toml``), or ``name`` itself when it is already a profile.

    Raises:
        ValueError: unknown name; the message lists the known ones.
        TypeError: ``name`` is neither a string nor an :class:`EnergyProfile`.
    """
    if isinstance(name, EnergyProfile):
        return name
    if not isinstance(name, str):
        raise TypeError(f"profile must be a name or an EnergyProfile, got {type(name).__name__}")
    profiles = _bundled()
    if name not in profiles:
        raise ValueError(
            f"unknown energy profile {name!r}; known profiles: {sorted(profiles)} "
            "(or load your own with energy.load_profile(path))"
        )
    return profiles[name]


def load_profile(path: str | Path) -> EnergyProfile:
    """Load one user profile from a TOML file (format in the module docstring).

    Args:
        path: the TOML file; its fields are at top level (no table), ``name`` included.

    Returns:
        The validated :class:`EnergyProfile`, usable wherever a profile name is (e.g.
        ``estimate(..., profile=load_profile(path))``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: invalid TOML, missing/unknown field, a negative energy or a bit width
            outside 1..64 (names the field).
        TypeError: a field of the wrong type (names the field).
    """
    path = Path(path)
    data = _toml_load(path.read_text(encoding="utf-8"), f"profile file {str(path)!r}")
    return EnergyProfile.from_dict(data, f"profile file {str(path)!r}")
