"""The state document in Vault as rotator reads it back: any shape it did not write is a clear
error (never a crash, never "no state"), whatever a hand edit or another tool put there."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest

from rotator import errors, model
from tests.unit.fakes import T0


def written() -> dict[str, Any]:
    """A document as rotator writes it: current, retiring, pending, intent and outcome set."""
    state = model.TargetState(
        current=model.CurrentKey("AKIACURRENT", T0, T0, T0),
        retiring=(model.RetiringKey("AKIAOLD", T0 + timedelta(days=1)),),
        pending=model.PendingKey("AKIANEW", model.Secret("pending-secret-for-document"), T0),
        intent=model.Intent(T0, ("AKIACURRENT",)),
        created_ids=("AKIACURRENT", "AKIAOLD"),
        last_success_at=T0,
        retry_after=T0,
    )
    return state.to_document()


def test_the_written_document_reads_back_the_same() -> None:
    assert model.TargetState.from_document(written()).to_document() == written()


def edit(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(written())
    *parents, last = path.split(".")
    node = doc
    for name in parents:
        node = node[name]
    node[last] = value
    return doc


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("current.created", 12345),  # a number where a time string goes
        ("current.created", "9999-12-31T23:59:59-05:00"),  # past datetime's last year in UTC
        ("current.created", "9999-01-01T00:00:00Z"),  # adding max_age would overflow
        ("outcome.retry_after", "0001-01-01T00:00:00+01:00"),  # before datetime's first year
        ("outcome.retry_after", "1969-12-31T23:59:59Z"),
        ("identity", "x"),  # a string where a mapping goes
        ("outcome", [1]),
        ("retiring", [{"key_id": "AKIAOLD"}]),  # a required field missing
        ("pending.attempts", "many"),
    ],
)
def test_a_shape_rotator_did_not_write_is_a_clear_malformed_state_error(
    path: str, value: Any
) -> None:
    with pytest.raises(errors.StateSchemaError) as caught:
        model.TargetState.from_document(edit(path, value))

    assert "rotator state is malformed" in str(caught.value)
    assert "restore a previous KV version" in str(caught.value)
    assert "pending-secret-for-document" not in str(caught.value)
