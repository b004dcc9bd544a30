"""Conversions between the UCUM units one code is charted in, for the model inputs.

Stage: model inputs. In: two UCUM unit codes, a value's and its token's main unit (``[lb_av]`` and
``kg``). Out: the ``(scale, offset)`` that turns a value in the first into the second
(``value * scale + offset``), or None where the two must stay apart.

UCUM's grammar and its units' definitions come from ``ucumvert`` (the UCUM specification's own
``ucum-essence.xml``, read into a ``pint`` registry). A conversion is refused, and the values stay
a token of their own, wherever dimensional analysis alone would mislead a clinical reading:

* a unit that is not UCUM (``milligram per deciliter``, free text): its meaning is a guess;
* annotations that differ: ``mL/min/{1.73_m2}`` (an eGFR indexed to body surface area) and
  ``mL/min`` (a clearance that is not) are two quantities, though UCUM gives annotations no
  dimension;
* a dimensionless unit on either side: ``%`` and ``mmol/mol`` are both pure ratios, yet an HbA1c
  of 7 % (NGSP) is 53 mmol/mol (IFCC), not 70;
* an arbitrary unit (``[IU]``, ``[arb'U]``, ``[CFU]``) or an equivalent (``eq``) on one side only:
  an international unit has no fixed relation to any other unit, and an equivalent is a mole times
  the ion's valence (1 mmol of calcium is 2 meq), which UCUM sets to one;
* different dimensions: ``mg/dL`` against ``mmol/L`` needs the analyte's molar mass.

For people, a unit is shown in UCUM's print symbols (:func:`unit_print_symbol`): ``mm Hg`` for
``mm[Hg]``, ``10³/μL`` for ``10*3/uL``, ``mL/min/1.73 m2`` for ``mL/min/{1.73_m2}``; the codes
stay what the tables and ``vocabulary.json`` store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

EQUIVALENT = "eq"
"""UCUM's equivalent: a mole in UCUM's definitions, a mole times the valence in a laboratory's."""


@cache
def _ucum() -> tuple[Any, Any, Any]:
    """UCUM's parser, a pint registry holding UCUM's units, and the parse-tree to quantity transformer
    on that registry (ucumvert's own ``from_ucum`` builds its quantities on pint's process-wide
    registry instead). Loaded on first use only (0.4 s): most warehouses chart each code in one
    unit and never need them."""
    from ucumvert import PintUcumRegistry
    from ucumvert.ucum_pint import UcumToPintTransformer

    registry = PintUcumRegistry()
    return _parser(), registry, UcumToPintTransformer(registry)


@cache
def _parser() -> Any:
    """UCUM's grammar as a parser (without the pint registry: printing a unit needs only this)."""
    from ucumvert.parser import get_ucum_parser

    return get_ucum_parser()


@cache
def _arbitrary_units() -> frozenset[str]:
    """UCUM's atoms marked ``isArbitrary`` (``[IU]``, ``[arb'U]``, ``[CFU]``, ...)."""
    from ucumvert.xml_util import get_units_with_full_definition

    return frozenset(unit.code_cs for unit in get_units_with_full_definition() if unit.is_arbitrary)


@dataclass(frozen=True)
class _Unit:
    quantity: Any
    """The unit as a pint quantity (a magnitude beside the unit for a factor in the code: ``10*3/uL``)."""
    dimensionality: Any
    dimensionless: bool
    annotations: tuple[str, ...]
    """Its ``{...}`` annotations, sorted."""
    special: frozenset[str]
    """Its arbitrary-unit and equivalent atoms."""


@cache
def _parsed(unit: str) -> _Unit | None:
    """``unit`` read as UCUM; None when it is not UCUM, or no quantity (an annotation alone,
    ``{score}``)."""
    from lark.exceptions import LarkError
    from ucumvert.parser import parse_ucum

    parser, registry, transformer = _ucum()
    try:
        tree = parse_ucum(unit, parser)
        quantity = transformer.transform(tree)
        if not isinstance(quantity, registry.Quantity):
            return None
        dimensionality, dimensionless = quantity.dimensionality, quantity.dimensionless
    except (LarkError, OverflowError):
        # Not UCUM; UCUM that pint cannot express (``[pH]``; a rate of an offset unit, ``Cel/h``); or
        # a power of ten beyond a float (``10*999999``).
        return None
    tokens = [(token.type, str(token)) for token in tree.scan_values(lambda value: True)]
    return _Unit(
        quantity, dimensionality, dimensionless,
        annotations=tuple(sorted(text for kind, text in tokens if kind == "ANNOTATION")),
        special=frozenset(text for kind, text in tokens if kind.startswith("UNIT_")
                          and (text in _arbitrary_units() or text == EQUIVALENT)))


def unit_conversion(unit: str, into: str) -> tuple[float, float] | None:
    """``(scale, offset)`` with ``value_in_into = value * scale + offset`` for a value in ``unit``;
    None where the two units must stay apart (see the module docstring).

    >>> unit_conversion("[lb_av]", "kg")
    (0.45359237, 0.0)
    >>> unit_conversion("mL/min", "mL/min/{1.73_m2}") is None
    True
    """
    if unit == into:
        return 1.0, 0.0
    source, target = _parsed(unit), _parsed(into)
    if source is None or target is None:
        return None
    if (source.annotations != target.annotations or source.special != target.special
            or source.dimensionless or target.dimensionless or source.dimensionality != target.dimensionality):
        return None
    from pint.errors import OffsetUnitCalculusError

    registry = _ucum()[1]

    def converted(value: float) -> float:
        in_source = registry.Quantity(value * source.quantity.magnitude, source.quantity.units)
        return float(in_source.to(target.quantity.units).magnitude / target.quantity.magnitude)

    try:
        offset = converted(0.0)
        scale = converted(1.0) - offset
    except (OffsetUnitCalculusError, OverflowError, ZeroDivisionError):
        return None
    if not (math.isfinite(scale) and math.isfinite(offset) and scale > 0):
        # Factors beyond a float (10*300 against 10*-300): no value would survive the conversion.
        return None
    # Round off the last bits the subtraction leaves (0.4535923700000001 for a pound): the factors are
    # stored in vocabulary.json, where they should read as UCUM defines them.
    return float(f"{scale:.12g}"), float(f"{offset:.12g}")


PRINT_SYMBOL_OVERRIDES = {"[IU]": "IU", "m[Hg]": "m Hg"}
"""Print symbols read the English clinical way: UCUM prints an international unit ``i.U.`` and
puts a no-break space in ``m Hg``."""
_SUPERSCRIPT = str.maketrans("0123456789+-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻")


@cache
def _print_symbols() -> dict[str, str]:
    """UCUM's print symbol of each prefix, base unit and unit, by code (its code where it has none)."""
    from ucumvert.xml_util import root

    symbols: dict[str, str] = {}
    for kind in ("prefix", "base-unit", "unit"):
        for element in root.findall(f".//{{*}}{kind}[@Code]"):
            printed = element.find("{*}printSymbol")
            text = "".join(printed.itertext()).strip() if printed is not None else ""
            symbols.setdefault(element.attrib["Code"], text or element.attrib["Code"])
    return symbols | PRINT_SYMBOL_OVERRIDES


@cache
def unit_print_symbol(unit: str) -> str:
    """``unit``, a UCUM code, as people read it: each prefix and unit by its UCUM print symbol,
    exponents raised, annotations without their braces; ``unit`` itself when it is not UCUM.

    >>> [unit_print_symbol(u) for u in ("mm[Hg]", "10*3/uL", "kg/m2", "mL/min/{1.73_m2}", "Cel")]
    ['mm Hg', '10³/μL', 'kg/m²', 'mL/min/1.73 m2', '°C']
    >>> unit_print_symbol("milligram per deciliter")
    'milligram per deciliter'
    """
    from lark import Token, Tree
    from lark.exceptions import LarkError
    from ucumvert.parser import parse_ucum

    try:
        tree = parse_ucum(unit, _parser())
    except LarkError:
        return unit
    symbols = _print_symbols()

    def printed(node: Tree[Token] | Token, nested: bool = False) -> str:
        if isinstance(node, Token):
            if node.type == "EXPONENT":
                return str(node).translate(_SUPERSCRIPT)
            if node.type == "OPERATOR" and node == ".":
                return "·"
            if node.type == "ANNOTATION":
                return str(node)[1:-1].replace("_", " ")
            return symbols.get(str(node), str(node))
        text = "".join(printed(child, nested=True) for child in node.children)
        if node.data == "component" and len(node.children) == 2:
            # A unit with an annotation (mg{creat}): the annotation said after the unit.
            text = " ".join(printed(child, nested=True) for child in node.children)
        # A term inside another term was in parentheses: mg/(kg.d).
        return f"({text})" if nested and node.data == "main_term" else text

    return printed(tree)
