"""One schema source: the statuses and columns declared in facedata/core/schema.py are the ones the README,
the dataset card and the published features use."""

from __future__ import annotations

from conftest import REPO
from facedata.core import records
from facedata.core.schema import COLUMNS, STEPS, Status, field_descriptions, reasons, status_list


def test_every_status_has_a_step_a_meaning_and_a_constant():
    for status in Status:
        assert status.value == status and (status is Status.OK or status.step in STEPS) and status.description
        assert getattr(records, status.name) == status.value
    assert len({s.value for s in Status}) == len(Status)


def test_readme_lists_every_status_by_step():
    readme = " ".join(REPO.joinpath("README.md").read_text().split())
    assert status_list() in readme


def test_card_explains_every_drop_reason_and_published_field():
    from facedata.publish import card
    from facedata.publish.writer import publish_features

    assert card.REASONS == reasons() and set(card.REASONS) == {s.value for s in Status} - {"ok"}
    assert set(publish_features()) <= set(field_descriptions()) == set(card.FIELDS)
    assert len({c.name for c in COLUMNS}) == len(COLUMNS)
