from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from polars.testing import assert_frame_equal
from sklearn.exceptions import NotFittedError

from features.cohorts import select_cohort
from features.labels import build_labels
from features.leakage import find_leaks, find_negative_offsets
from features.tokenize import PAD, UNK, EventTokenizer, extend_unit_conversions, units_in_use, value_bin_edges
from tests.features.task_fixtures import BP, T0, VISIT, day, events_frame, task, toy_events


def fitted(**kwargs: int) -> tuple[EventTokenizer, pl.DataFrame]:
    cohort = select_cohort(toy_events(), task()).cohort
    params = {"max_events": 10, "value_bins": 2, "min_code_count": 1} | kwargs
    return EventTokenizer(**params).fit(toy_events(), cohort, [1, 2, 3]), cohort


def test_fit_learns_on_train_only_before_prediction_time() -> None:
    tokenizer, _ = fitted()
    assert list(tokenizer.vocabulary_)[:2] == [PAD, UNK]
    # Train patients 1-3 have BP 110, 120, 130 before day 0; patient 1's 180 is after it. The edge
    # lies halfway between the median and the next value, so no value sits on it.
    assert tokenizer.bin_edges_[BP] == [125.0]
    assert "SNOMED//22298006" not in tokenizer.vocabulary_  # the outcome is after day 0


def test_transform_cuts_at_prediction_time_and_bins_values() -> None:
    tokenizer, cohort = fitted()
    tokens = tokenizer.transform(toy_events(), cohort)
    assert tokens["subject_id"].to_list() == [1, 2, 3, 4]
    first = tokens.row(0, named=True)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    assert [names[t] for t in first["token_ids"]] == [
        "SEX//female", "MEDS_BIRTH", BP, "SNOMED//59621000", "SNOMED//11429006"]
    assert first["time_before_days"][0] is None and first["time_before_days"][-1] == 0.0
    assert first["value_bins"] == [0, 0, 1, 0, 0]  # BP 110 < 125 -> bin 1
    assert tokens.row(3, named=True)["value_bins"][2] == 2  # patient 4: BP 140 >= 125 -> bin 2
    assert first["last_input_time"] == T0
    assert find_leaks(tokens, cohort, "last_input_time").height == 0
    assert find_negative_offsets(tokens).height == 0


def test_length_limit_keeps_facts_and_most_recent() -> None:
    # Room for one fact (half of 3): birth, whose time is the patient's age, over sex; then the two
    # most recent events.
    tokenizer, cohort = fitted(max_events=3)
    tokens = tokenizer.transform(toy_events(), cohort)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    assert [names[t] for t in tokens.row(0, named=True)["token_ids"]] == [
        "MEDS_BIRTH", "SNOMED//59621000", "SNOMED//11429006"]
    tokenizer.max_static_events = 2
    tokens = tokenizer.transform(toy_events(), cohort)
    assert [names[t] for t in tokens.row(0, named=True)["token_ids"]] == [
        "SEX//female", "MEDS_BIRTH", "SNOMED//11429006"]


def test_a_long_record_or_a_wide_panel_keeps_birth_sex_and_genotypes() -> None:
    # Ten visits and a ten-gene expression panel measured in every patient: by vocabulary order
    # alone the panel would come before sex (half the patients each), and birth, the oldest event,
    # would be the first cut, leaving the model without age.
    rows: list[tuple[int, datetime | None, str, float | None, str | None, str]] = []
    for sid in (1, 2):
        rows += [(sid, None, "SEX//female" if sid == 1 else "SEX//male", None, None, "ehr"),
                 (sid, None, "GENE//CYP2C19", 1.0, "rs4244285", "genomics"),
                 (sid, day(-365.25 * (70 + sid)), "MEDS_BIRTH", None, None, "ehr")]
        rows += [(sid, None, f"EXPRESSION//G{g:02d}", float(g), None, "genomics") for g in range(10)]
        rows += [(sid, day(-10 * v), VISIT, None, None, "ehr") for v in range(10)]
    events = events_frame(rows)
    cohort = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [T0, T0]},
                          schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    tokenizer = EventTokenizer(max_events=8, min_code_count=1).fit(events, cohort, [1, 2])
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    tokens = tokenizer.transform(events, cohort)
    assert [names[t] for t in tokens.row(0, named=True)["token_ids"]] == [
        "EXPRESSION//G00", "GENE//CYP2C19//rs4244285", "SEX//female", "MEDS_BIRTH", VISIT, VISIT, VISIT, VISIT]
    assert tokens.row(1, named=True)["time_before_days"][3] == pytest.approx(365.25 * 72)
    assert tokens["dropped_events"].to_list() == [15, 15]


def test_unknown_codes_dropped_and_patients_without_events_kept() -> None:
    tokenizer, cohort = fitted()
    extra = events_frame([(9, day(-1), "LOINC//never-seen", 1.0, None, "ehr")])
    cohort9 = pl.concat([cohort, cohort.head(1).with_columns(pl.lit(9, pl.Int64).alias("subject_id"))])
    tokens = tokenizer.transform(pl.concat([toy_events(), extra]), cohort9)
    row = tokens.filter(pl.col("subject_id") == 9).row(0, named=True)
    assert row["token_ids"] == [] and row["last_input_time"] is None


def test_not_fitted_and_roundtrip(tmp_path: Path) -> None:
    with pytest.raises(NotFittedError):
        EventTokenizer().transform(toy_events(), select_cohort(toy_events(), task()).cohort)
    tokenizer, cohort = fitted()
    loaded = EventTokenizer.load(tokenizer.save(tmp_path / "vocabulary.json"))
    assert loaded.transform(toy_events(), cohort).equals(tokenizer.transform(toy_events(), cohort))


def test_events_at_the_same_time_are_listed_and_cut_the_same_way_in_any_row_order() -> None:
    tokenizer, cohort = fitted(max_events=5)
    # Patient 1: three blood pressures in the same minute before day 0; the limit cuts among them.
    tied = events_frame([(1, day(-10), BP, v, None, "ehr") for v in (150.0, 105.0, 125.0)])
    events = pl.concat([toy_events(), tied])
    results = [tokenizer.transform(frame, cohort) for frame in (events, events.reverse(), events.sample(
        fraction=1.0, shuffle=True, seed=5))]
    first = results[0].row(0, named=True)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    # Sex and birth, then the 3 most recent timed events: the visit and two of the three tied blood
    # pressures (ties in time are ordered by value: 105 and 125 are kept, 150 is cut).
    assert [names[t] for t in first["token_ids"]] == ["SEX//female", "MEDS_BIRTH", BP, BP, "SNOMED//11429006"]
    assert first["value_bins"] == [0, 0, 1, 2, 0]  # 105 < 120 <= 125
    for other in results[1:]:
        assert_frame_equal(other, results[0])


def panel_events() -> tuple[pl.DataFrame, pl.DataFrame]:
    """Patient 1: 3 static facts; patient 2: 6 (an expression panel). Both: 100 daily visits."""
    cohort = pl.DataFrame({"subject_id": [1, 2], "prediction_time": [day(0)] * 2},
                          schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    rows: list[tuple[int, datetime | None, str, float | None, str | None, str]] = []
    for sid, n_static in ((1, 3), (2, 6)):
        rows += [(sid, None, f"EXPRESSION//G{g}", 1.0, None, "genomics") for g in range(n_static)]
        rows += [(sid, day(-d), "SNOMED//59621000", None, None, "ehr") for d in range(1, 101)]
    return events_frame(rows), cohort


def test_static_facts_take_at_most_half_the_sequence_by_default() -> None:
    events, cohort = panel_events()
    tokenizer = EventTokenizer(max_events=4, value_bins=2, min_code_count=1).fit(events, cohort, [1, 2])
    tokens = tokenizer.transform(events, cohort)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    sequences = [[names[t] for t in ids] for ids in tokens["token_ids"].to_list()]
    # Each keeps 2 static facts in vocabulary order (G0-G2 are seen in two train patients, G3-G5
    # in one), then its 2 most recent visits: the panel does not crowd them out.
    for sequence in sequences:
        assert sequence == ["EXPRESSION//G0", "EXPRESSION//G1", "SNOMED//59621000", "SNOMED//59621000"]
    assert tokens["time_before_days"].to_list() == [[None, None, 2.0, 1.0]] * 2
    assert tokens["dropped_events"].to_list() == [99, 102]


def test_static_facts_may_fill_the_sequence_when_allowed_to() -> None:
    events, cohort = panel_events()
    tokenizer = EventTokenizer(max_events=4, value_bins=2, min_code_count=1, max_static_events=4)
    tokens = tokenizer.fit(events, cohort, [1, 2]).transform(events, cohort)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    sequences = [[names[t] for t in ids] for ids in tokens["token_ids"].to_list()]
    # Patient 1: its 3 static facts, then its most recent timed event; patient 2: 4 static facts
    # (G0, G1, G2, then G3 by token) and no timed event.
    assert sequences[0] == ["EXPRESSION//G0", "EXPRESSION//G1", "EXPRESSION//G2", "SNOMED//59621000"]
    assert sequences[1] == ["EXPRESSION//G0", "EXPRESSION//G1", "EXPRESSION//G2", "EXPRESSION//G3"]
    assert tokens["last_input_time"].to_list() == [day(-1), None]


def test_a_static_limit_beyond_the_sequence_is_refused() -> None:
    events, cohort = panel_events()
    with pytest.raises(ValueError, match=r"max_static_events must be between 0 and max_events \(4\) \(found 5\)"):
        EventTokenizer(max_events=4, max_static_events=5).fit(events, cohort, [1, 2])


def test_a_file_written_before_the_static_limit_reads_as_it_was_trained(tmp_path: Path) -> None:
    events, cohort = panel_events()
    tokenizer = EventTokenizer(max_events=4, value_bins=2, min_code_count=1).fit(events, cohort, [1, 2])
    path = tokenizer.save(tmp_path / "vocabulary.json")
    state = json.loads(path.read_text())
    assert state["max_static_events"] is None
    del state["max_static_events"]
    path.write_text(json.dumps(state))
    assert EventTokenizer.load(path).static_limit() == 4


def test_note_and_imaging_ids_are_not_part_of_the_token_but_coded_answers_are() -> None:
    cohort = pl.DataFrame({"subject_id": [1, 2, 3], "prediction_time": [day(0)] * 3},
                          schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    rows: list[tuple[int, datetime | None, str, float | None, str | None, str]] = []
    for sid in (1, 2, 3):
        # As features.events writes them: the text_value of these is a study or note id.
        rows += [
            (sid, day(-10), "IMAGING_STUDY//CT", None, f"study-{sid}", "ehr"),
            (sid, day(-10), "IMAGING//CT", None, f"study-{sid}", "imaging"),
            (sid, day(-9), "NOTE//progress", None, f"note-{sid}", "notes"),
            (sid, day(-8), "LOINC//72166-2", None, "SNOMED//8517006", "ehr"),  # a coded answer
            (sid, None, "GENE//CYP2C19", 1.0, "rs4244285", "genomics"),  # a variant
        ]
    events = events_frame(rows)
    for min_code_count in (1, 3):
        tokenizer = EventTokenizer(max_events=10, value_bins=2, min_code_count=min_code_count)
        tokenizer.fit(events, cohort, [1, 2, 3])
        assert tokenizer.vocabulary_ == {
            PAD: 0, UNK: 1, "GENE//CYP2C19//rs4244285": 2, "IMAGING//CT": 3, "IMAGING_STUDY//CT": 4,
            "LOINC//72166-2//SNOMED//8517006": 5, "NOTE//progress": 6}
        assert tokenizer.transform(events, cohort)["token_ids"].to_list() == [[2, 3, 4, 6, 5]] * 3


def test_value_bins_must_fit_in_int8() -> None:
    cohort = pl.DataFrame({"subject_id": list(range(300)), "prediction_time": [day(0)] * 300},
                          schema={"subject_id": pl.Int64, "prediction_time": pl.Datetime("us")})
    events = events_frame([(s, day(-1), BP, float(s), None, "ehr") for s in range(300)])
    tokenizer = EventTokenizer(value_bins=127, min_code_count=1).fit(events, cohort, list(range(300)))
    bins = tokenizer.transform(events, cohort)["value_bins"].explode()
    assert (bins.min(), bins.max()) == (1, 127)
    with pytest.raises(ValueError, match=r"EventTokenizer: value_bins must be between 1 and 127, as value bins "
                                         r"are stored as int8 in event_tokens.value_bins \(found 128\)"):
        EventTokenizer(value_bins=128, min_code_count=1).fit(events, cohort, list(range(300)))
    tokenizer.value_bins = 200  # a tokenizer changed after fit (or loaded from an edited file)
    with pytest.raises(ValueError, match=r"value_bins must be between 1 and 127.*\(found 200\)"):
        tokenizer.transform(events, cohort)


def test_inputs_are_placed_when_known_and_labels_read_when_it_happened() -> None:
    # Patient 1's BP of day -200 is known at once; a lab drawn 25 minutes before the prediction time
    # is issued 95 minutes after it (not an input); a diagnosis with onset on day -100 recorded on
    # day -10 is an input 10 days old. Patient 4's MI happened on day 400 and is known on day 420:
    # the label reads day 400.
    lab, late = "LOINC//2160-0", "SNOMED//44054006"
    known = toy_events().vstack(events_frame([(1, day(-25 / 1440), lab, 1.1, None, "ehr"),
                                              (1, day(-100), late, None, None, "ehr")]))
    known = known.with_columns(
        pl.when(pl.col("code") == lab).then(pl.lit(day(95 / 1440)))
        .when(pl.col("code") == late).then(pl.lit(day(-10)))
        .when((pl.col("subject_id") == 4) & (pl.col("code") == "SNOMED//22298006")).then(pl.lit(day(420)))
        .otherwise(pl.col("known_time")).alias("known_time")
    )
    cohort = select_cohort(known, task()).cohort
    tokenizer = EventTokenizer(10, 2, 1).fit(known, cohort, [1, 2, 3])
    assert lab not in tokenizer.vocabulary_
    tokens = tokenizer.transform(known, cohort)
    first = tokens.row(0, named=True)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    assert [names[t] for t in first["token_ids"]] == [
        "SEX//female", "MEDS_BIRTH", BP, "SNOMED//59621000", late, "SNOMED//11429006"]
    assert first["time_before_days"][4] == pytest.approx(10.0)  # listed in the order it became known
    assert find_leaks(tokens, cohort, "last_input_time").height == 0
    labels, _ = build_labels(known, cohort, task())
    assert labels.filter(pl.col("subject_id") == 4)["duration_days"].item() == pytest.approx(400.0)


def test_events_without_known_time_are_refused() -> None:
    cohort = select_cohort(toy_events(), task()).cohort
    with pytest.raises(ValueError, match=r"events table has no known_time column .*ingest the landing zone again"):
        EventTokenizer(10, 2, 1).fit(toy_events().drop("known_time"), cohort, [1, 2, 3])


def test_genotypes_get_a_bin_each_however_rare_the_alt_alleles() -> None:
    # 90 train patients with 0 alt alleles, 9 with 1, 1 with 2: every quantile is 0, and quantile
    # edges had put 0, 1 and 2 in one bin.
    ids = list(range(100))
    genotypes = [0.0] * 90 + [1.0] * 9 + [2.0]
    events = pl.DataFrame({
        "subject_id": ids, "time": pl.Series([None] * 100, dtype=pl.Datetime("us")),
        "known_time": pl.Series([None] * 100, dtype=pl.Datetime("us")), "code": ["GENE//LPA"] * 100,
        "numeric_value": genotypes, "text_value": ["rs10455872"] * 100,
        "modality": ["genomics"] * 100})
    cohort = pl.DataFrame({"subject_id": ids, "prediction_time": [T0] * 100})
    tokenizer = EventTokenizer(value_bins=5, min_code_count=1).fit(events, cohort, ids)
    assert tokenizer.bin_edges_ == {"GENE//LPA//rs10455872": [0.5, 1.5]}
    bins = tokenizer.transform(events, cohort)["value_bins"].explode().to_list()
    assert (bins[0], bins[89], bins[90], bins[99]) == (1, 1, 2, 3)


def static_values(code: str, values: list[float]) -> tuple[pl.DataFrame, pl.DataFrame]:
    ids = list(range(len(values)))
    events = pl.DataFrame({
        "subject_id": ids, "time": pl.Series([day(-1)] * len(ids), dtype=pl.Datetime("us")),
        "known_time": pl.Series([None] * len(ids), dtype=pl.Datetime("us")), "code": [code] * len(ids),
        "numeric_value": values, "text_value": pl.Series([None] * len(ids), dtype=pl.String),
        "modality": ["ehr"] * len(ids)})
    return events, pl.DataFrame({"subject_id": ids, "prediction_time": [T0] * len(ids)})


def test_a_value_most_patients_share_at_the_top_leaves_the_values_below_it_a_bin() -> None:
    # Glasgow coma scale: 90 patients at the normal 15, 10 between 3 and 12. Quantile edges all fall
    # on 15, the largest value, and had put a coma score of 3 in the bin of a normal 15.
    events, cohort = static_values("LOINC//9269-2", [15.0] * 90 + [float(v) for v in range(3, 13)])
    tokenizer = EventTokenizer(value_bins=5, min_code_count=1).fit(events, cohort, cohort["subject_id"])
    assert tokenizer.bin_edges_ == {"LOINC//9269-2": [13.5]}
    bins = tokenizer.transform(events, cohort)["value_bins"].explode().to_list()
    assert (bins[0], bins[90], bins[99]) == (2, 1, 1)


def test_a_common_value_in_the_middle_gets_a_bin_of_its_own_from_both_sides() -> None:
    # Saturation: 60 % at 98, the hypoxic values below it must not share its bin.
    hypoxic = [85.0, 88.0, 90.0, 92.0, 94.0, 95.0, 96.0, 97.0, 97.0, 96.0, 95.0, 94.0]
    values = hypoxic + [98.0] * 60 + [99.0] * 14 + [100.0] * 14
    assert value_bin_edges(np.array(values), 5) == [97.5, 98.5, 99.5]


def test_heavy_values_never_make_more_bins_than_asked_for() -> None:
    # Four values at a bin's worth each with a stray below each: a cut on both sides of every heavy
    # value would make 9 bins; the neighbouring bins with the fewest values are merged back to 5.
    values = np.array([10.0] * 20 + [20.0] * 20 + [30.0] * 20 + [40.0] * 20 + [50.0] * 16 + [5.0, 15.0, 25.0, 35.0])
    edges = value_bin_edges(values, 5)
    assert edges == [12.5, 22.5, 32.5, 45.0]
    continuous = np.random.default_rng(0).normal(size=1000)
    assert np.allclose(value_bin_edges(continuous, 5), np.quantile(continuous, [0.2, 0.4, 0.6, 0.8]), atol=0.01)


def test_values_of_many_tokens_are_binned_each_by_its_own_edges() -> None:
    codes = [f"LOINC//{i}" for i in range(30)]
    rows = [(s, day(-1), code, float(s + 10 * i), None, "ehr") for i, code in enumerate(codes) for s in range(1, 5)]
    events = events_frame(rows)
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [T0] * 4})
    tokenizer = EventTokenizer(value_bins=2, min_code_count=1).fit(events, cohort, [1, 2, 3, 4])
    assert tokenizer.bin_edges_["LOINC//7"] == [72.5]
    tokens = tokenizer.transform(events, cohort)
    # Each patient's 30 values: patients 1 and 2 below each code's median, 3 and 4 above.
    assert [set(bins) for bins in tokens["value_bins"].to_list()] == [{1}, {1}, {2}, {2}]


WEIGHT = "LOINC//29463-7"
EGFR = "LOINC//33914-3"


def weights_frame(rows: list[tuple[int, float, str | None]], code: str = WEIGHT) -> pl.DataFrame:
    """One measurement of ``code`` (a body weight) per (subject, value, unit), a day before T0."""
    frame = events_frame([(s, day(-1), code, value, None, "ehr") for s, value, _ in rows])
    return frame.with_columns(pl.Series("unit", [unit for *_, unit in rows], dtype=pl.String))


def test_values_in_a_unit_ucum_converts_are_read_in_the_main_unit(tmp_path: Path) -> None:
    # Five patients weighed in kg, three in pounds (another hospital's scale), one without a unit.
    # 198 lb is 89.8 kg: converted, it bins beside 90 kg, not as the heaviest patient.
    rows = [(1, 60.0, "kg"), (2, 70.0, "kg"), (3, 80.0, "kg"), (4, 90.0, "kg"), (5, 100.0, "kg"),
            (6, 132.0, "[lb_av]"), (7, 165.0, "[lb_av]"), (8, 198.0, "[lb_av]"), (9, 75.0, None)]
    events = weights_frame(rows)
    cohort = pl.DataFrame({"subject_id": list(range(1, 10)), "prediction_time": [T0] * 9})
    tokenizer = EventTokenizer(value_bins=2, min_code_count=1).fit(events, cohort, list(range(1, 10)))
    assert tokenizer.units_ == {WEIGHT: "kg"}
    assert tokenizer.unit_conversions_ == {WEIGHT: {"[lb_av]": (0.45359237, 0.0)}}
    assert [t for t in tokenizer.vocabulary_ if t.startswith(WEIGHT)] == [WEIGHT, f"{WEIGHT}//{{no unit}}"]
    # The median of the eight weights in kg lies between 165 lb (74.8 kg) and 80 kg.
    assert tokenizer.bin_edges_[WEIGHT] == [pytest.approx((165 * 0.45359237 + 80) / 2, abs=1e-4)]
    tokens = tokenizer.transform(events, cohort)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    assert [names[ids[0]] for ids in tokens["token_ids"].to_list()] == [WEIGHT] * 8 + [f"{WEIGHT}//{{no unit}}"]
    assert [bins[0] for bins in tokens["value_bins"].to_list()] == [1, 1, 2, 2, 2, 1, 1, 2, 1]
    # The conversions travel with the vocabulary, so scoring reads pounds as training did.
    loaded = EventTokenizer.load(tokenizer.save(tmp_path / "vocabulary.json"))
    assert loaded.unit_conversions_ == tokenizer.unit_conversions_
    assert_frame_equal(loaded.transform(events, cohort), tokens)


def test_values_in_a_unit_that_must_stay_apart_are_a_token_of_their_own_with_their_own_bins() -> None:
    # An eGFR per 1.73 m2 of body surface and a clearance in plain mL/min are two quantities, though
    # UCUM gives the annotation no dimension: binned together, a clearance would read as an eGFR.
    rows = [(1, 30.0, "mL/min/{1.73_m2}"), (2, 45.0, "mL/min/{1.73_m2}"), (3, 60.0, "mL/min/{1.73_m2}"),
            (4, 90.0, "mL/min/{1.73_m2}"), (5, 40.0, "mL/min"), (6, 80.0, "mL/min"), (7, 120.0, "mL/min")]
    events = weights_frame(rows, EGFR)
    cohort = pl.DataFrame({"subject_id": list(range(1, 8)), "prediction_time": [T0] * 7})
    tokenizer = EventTokenizer(value_bins=2, min_code_count=1).fit(events, cohort, list(range(1, 8)))
    assert tokenizer.units_ == {EGFR: "mL/min/{1.73_m2}"} and tokenizer.unit_conversions_ == {}
    assert tokenizer.bin_edges_ == {EGFR: [52.5], f"{EGFR}//mL/min": [100.0]}
    tokens = tokenizer.transform(events, cohort)
    names = {v: k for k, v in tokenizer.vocabulary_.items()}
    assert [names[ids[0]] for ids in tokens["token_ids"].to_list()] == [EGFR] * 4 + [f"{EGFR}//mL/min"] * 3
    assert [bins[0] for bins in tokens["value_bins"].to_list()] == [1, 1, 2, 2, 1, 1, 2]


def test_a_unit_too_rare_for_the_vocabulary_or_new_after_fit_and_kept_apart_leaves_its_values_out() -> None:
    rows = [(1, 60.0, "mL/min/{1.73_m2}"), (2, 70.0, "mL/min/{1.73_m2}"), (3, 80.0, "mL/min/{1.73_m2}"),
            (4, 100.0, "mL/min")]
    events = weights_frame(rows, EGFR)
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4], "prediction_time": [T0] * 4})
    tokenizer = EventTokenizer(value_bins=2, min_code_count=2).fit(events, cohort, [1, 2, 3, 4])
    assert f"{EGFR}//mL/min" not in tokenizer.vocabulary_
    tokens = tokenizer.transform(events, cohort)
    assert tokens["token_ids"].list.len().to_list() == [1, 1, 1, 0]
    # A clearance first charted after fit is left out the same way: it is not the eGFR the model learned.
    egfr_only = EventTokenizer(value_bins=2, min_code_count=1).fit(weights_frame(rows[:3], EGFR), cohort, [1, 2, 3])
    assert egfr_only.transform(events, cohort)["token_ids"].list.len().to_list() == [1, 1, 1, 0]


def test_a_unit_first_seen_after_fit_that_ucum_converts_is_read_on_the_learned_scale(tmp_path: Path) -> None:
    # Trained on weights in kg; a scale in pounds arrives later. 187 lb is 84.8 kg: above the
    # median of the train weights (75 kg), so in the upper bin, where 187 read as kg would also be,
    # and 143 lb (64.9 kg) in the lower one, where 143 read as kg would not.
    train_rows = [(1, 60.0, "kg"), (2, 70.0, "kg"), (3, 80.0, "kg"), (4, 90.0, "kg")]
    cohort = pl.DataFrame({"subject_id": [1, 2, 3, 4, 5, 6], "prediction_time": [T0] * 6})
    tokenizer = EventTokenizer(value_bins=2, min_code_count=1).fit(weights_frame(train_rows), cohort, [1, 2, 3, 4])
    assert tokenizer.unit_conversions_ == {} and tokenizer.bin_edges_ == {WEIGHT: [75.0]}
    events = weights_frame([*train_rows, (5, 143.0, "[lb_av]"), (6, 187.0, "[lb_av]")])
    tokens = tokenizer.transform(events, cohort)
    assert tokens["token_ids"].to_list() == [[tokenizer.vocabulary_[WEIGHT]]] * 6
    assert tokens["value_bins"].to_list() == [[1], [1], [2], [2], [1], [2]]
    # Nothing learned changes: the conversion is found again on each transform, not saved.
    assert tokenizer.unit_conversions_ == {}
    assert "unit_conversions" not in json.loads(tokenizer.save(tmp_path / "vocabulary.json").read_text())


def test_extend_unit_conversions_adds_only_new_units_ucum_converts_and_keeps_own_tokens() -> None:
    events = pl.concat([
        weights_frame([(1, 70.0, "kg"), (2, 154.0, "[lb_av]"), (3, 2.0, "[stone_av]"), (4, 70000.0, "g")]),
        weights_frame([(5, 60.0, "mL/min/{1.73_m2}"), (6, 40.0, "mL/min")], EGFR),
    ]).lazy()
    units = {WEIGHT: "kg", EGFR: "mL/min/{1.73_m2}"}
    learned = {WEIGHT: {"[lb_av]": (0.45359237, 0.0)}}
    assert extend_unit_conversions(events, units, learned) == {
        WEIGHT: {"[lb_av]": (0.45359237, 0.0), "[stone_av]": (6.35029318, 0.0), "g": (0.001, 0.0)}}
    # A unit with a token of its own (kept apart by a model trained before conversions) keeps it.
    assert extend_unit_conversions(events, units, {}, own_tokens=[f"{WEIGHT}//[lb_av]"]) == {
        WEIGHT: {"[stone_av]": (6.35029318, 0.0), "g": (0.001, 0.0)}}
    # No main units (a vocabulary written before units): nothing to convert into.
    assert extend_unit_conversions(events, {}, {}) == {}


def test_events_without_a_unit_column_and_files_without_units_read_as_before(tmp_path: Path) -> None:
    # A warehouse ingested before events carried units, and a vocabulary.json written then: every
    # value is the bare token's, as the model saved with that file was trained.
    tokenizer, cohort = fitted()
    assert tokenizer.units_ == {BP: "{no unit}"}
    path = tokenizer.save(tmp_path / "vocabulary.json")
    state = json.loads(path.read_text())
    del state["units"]
    path.write_text(json.dumps(state))
    loaded = EventTokenizer.load(path)
    assert loaded.units_ == {} and loaded.unit_conversions_ == {}
    # Nothing converted: the file has no conversions, as files written before conversions had not.
    assert "unit_conversions" not in state
    with_units = toy_events().with_columns(pl.lit("mm[Hg]").alias("unit"))
    assert_frame_equal(loaded.transform(with_units, cohort), tokenizer.transform(toy_events(), cohort))


def test_units_in_use_keeps_the_main_units_of_vocabulary_tokens_only() -> None:
    units = {WEIGHT: "kg", BP: "mm[Hg]", "LOINC//rare": "g"}
    assert units_in_use(units, [f"{WEIGHT}//[lb_av]", BP, "SEX//female"]) == {BP: "mm[Hg]", WEIGHT: "kg"}
