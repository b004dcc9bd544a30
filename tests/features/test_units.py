from __future__ import annotations

import pytest

from features.units import unit_conversion, unit_print_symbol


@pytest.mark.parametrize(("unit", "into", "scale", "offset"), [
    ("[lb_av]", "kg", 0.45359237, 0.0),
    ("kg", "[lb_av]", 2.20462262185, 0.0),
    ("[in_i]", "cm", 2.54, 0.0),
    ("g/dL", "g/L", 10.0, 0.0),
    ("umol/L", "mmol/L", 0.001, 0.0),
    ("10*3/uL", "10*9/L", 1.0, 0.0),
    ("mm[Hg]", "kPa", 0.133322387415, 0.0),
    ("meq/L", "eq/L", 0.001, 0.0),
    ("m[IU]/mL", "[IU]/L", 1.0, 0.0),
    ("kg", "kg", 1.0, 0.0),
])
def test_units_of_one_quantity_convert_by_their_ucum_factor(unit: str, into: str, scale: float, offset: float) -> None:
    assert unit_conversion(unit, into) == (scale, offset)


def test_temperatures_convert_with_their_offset() -> None:
    scale, offset = unit_conversion("[degF]", "Cel") or (0.0, 0.0)
    assert (98.6 * scale + offset, 212 * scale + offset) == (pytest.approx(37.0), pytest.approx(100.0))
    assert unit_conversion("Cel", "[degF]") == (1.8, 32.0)


@pytest.mark.parametrize(("unit", "into"), [
    # Another quantity under the same dimension: an eGFR indexed to body surface area, a clearance not.
    ("mL/min", "mL/min/{1.73_m2}"),
    # Mass against amount of substance: needs the analyte's molar mass.
    ("mg/dL", "mmol/L"),
    # Pure ratios: an HbA1c of 7 % (NGSP) is 53 mmol/mol (IFCC), no factor of ten.
    ("%", "mmol/mol"),
    ("%", "1"),
    # An equivalent is a mole times the valence, which UCUM sets to one (1 mmol calcium is 2 meq).
    ("meq/L", "mmol/L"),
    # An international unit has no fixed relation to other units (UCUM: arbitrary).
    ("[IU]/L", "10*3/uL"),
    ("U/L", "[IU]/L"),
    # Not UCUM, an annotation alone, a rate of an offset unit pint cannot scale, a factor beyond a float.
    ("milligram per deciliter", "mg/dL"),
    ("{score}", "1"),
    ("Cel/h", "[degF]/h"),
    ("10*999999/L", "10*9/L"),
])
def test_units_that_must_stay_apart_have_no_conversion(unit: str, into: str) -> None:
    assert unit_conversion(unit, into) is None


@pytest.mark.parametrize(("unit", "printed"), [
    ("mm[Hg]", "mm Hg"), ("10*3/uL", "10³/μL"), ("10*9/L", "10⁹/L"), ("kg/m2", "kg/m²"), ("s-1", "s⁻¹"),
    ("mL/min/{1.73_m2}", "mL/min/1.73 m2"), ("{beats}/min", "beats/min"), ("mg/g{creat}", "mg/g creat"),
    ("mg/(kg.d)", "mg/(kg·d)"), ("[lb_av]", "lb"), ("Cel", "°C"), ("[degF]", "°F"), ("ug/L", "μg/L"),
    ("[IU]/L", "IU/L"), ("%", "%"), ("mg/dL", "mg/dL"),
    # Not UCUM: shown as sent.
    ("milligram per deciliter", "milligram per deciliter"), ("(score)", "(score)"),
])
def test_a_unit_is_printed_with_ucums_print_symbols(unit: str, printed: str) -> None:
    assert unit_print_symbol(unit) == printed
