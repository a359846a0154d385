"""Report UIDs are a function of (source instance, model): a resend after a crash replaces the
report in the PACS instead of adding a second one."""

from __future__ import annotations

from pydicom.uid import UID

from node.report.uids import ReportUIDs, device_uid

SOURCE = "1.2.826.0.1.3680043.8.498.1"


def test_report_uids_are_deterministic_valid_and_distinct_per_model() -> None:
    first, again = ReportUIDs(SOURCE, "aa" * 32), ReportUIDs(SOURCE, "aa" * 32)
    other_model = ReportUIDs(SOURCE, "bb" * 32)
    uids = [first.sr_series, first.sr_instance, first.sc_series, first.sc_instance, first.tracking]
    assert uids == [again.sr_series, again.sr_instance, again.sc_series, again.sc_instance,
                    again.tracking]  # fmt: skip
    assert len(set(uids)) == 5 and other_model.sr_instance not in uids
    for uid in uids:
        assert UID(uid).is_valid and uid.startswith("2.25.")
    assert device_uid("XRAYAGE") == device_uid("XRAYAGE") != device_uid("XRAYAGE2")
