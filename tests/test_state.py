"""crflow/state.py: what the cluster's state Secret holds, and how a run's state_dir and it meet."""

from __future__ import annotations

import json

import pytest

from crflow.errors import CrflowError
from crflow.identity import Identity
from crflow.state import merge, pack, to_hold


def a_state(path, ca="AA", logins=None, credentials=0):
    (path / "results").mkdir(parents=True)
    Identity(ca=ca, logins=logins or {"generation 0 of user u": "id0"}).save(path)
    (path / "generations.json").write_text(json.dumps({"credentials": credentials}))
    (path / "results" / "record0").write_text("first")
    (path / "results" / ".keycheck").write_text("token")
    return path


def test_pack_holds_the_records_and_numbers_but_never_the_key_or_the_client_files(tmp_path):
    state = a_state(tmp_path / "s")
    (state / "result.key").write_text("the key")
    (state / "client").mkdir()
    (state / "client" / "auth.json").write_text("{}")
    assert sorted(pack(state)) == ["generations.json", "identity.json", "results..keycheck", "results.record0"]


def test_a_fresh_directory_takes_everything_held(tmp_path):
    held = pack(a_state(tmp_path / "held", credentials=3))
    fresh = tmp_path / "fresh"
    merge(fresh, held, "the Secret")
    assert pack(fresh) == held


def test_the_held_generations_and_records_win_and_identities_are_joined(tmp_path):
    held = pack(a_state(tmp_path / "held", credentials=2, logins={"generation 2 of user u": "id2"}))
    local = a_state(tmp_path / "local", credentials=1)
    (local / "results" / "record0").write_text("made again with another key")
    merge(local, held, "the Secret")
    assert json.loads((local / "generations.json").read_text())["credentials"] == 2
    assert (local / "results" / "record0").read_text() == "first"
    assert Identity.load(local).logins == {"generation 0 of user u": "id0", "generation 2 of user u": "id2"}


@pytest.mark.parametrize("clash", [{"ca": "BB"}, {"logins": {"generation 0 of user u": "another"}}])
def test_another_sites_state_is_refused(tmp_path, clash):
    held = pack(a_state(tmp_path / "held"))
    local = a_state(tmp_path / "local", **clash)
    with pytest.raises(CrflowError, match="belongs to another site"):
        merge(local, held, "the Secret")


def test_a_held_record_is_never_replaced_and_nothing_is_held_before_a_ca(tmp_path):
    held = pack(a_state(tmp_path / "held"))
    local = a_state(tmp_path / "local", credentials=5)
    (local / "results" / "record0").write_text("made again with another key")
    (local / "results" / "record1").write_text("new")
    kept = to_hold(local, held)
    assert kept["results.record0"] == b"first" and kept["results.record1"] == b"new"
    assert json.loads(kept["generations.json"])["credentials"] == 5
    empty = tmp_path / "empty"
    (empty / "results").mkdir(parents=True)
    (empty / "results" / ".keycheck").write_text("a key nobody else has")
    assert to_hold(empty, held) is None


def test_a_record_name_that_would_leave_the_results_folder_is_refused(tmp_path):
    with pytest.raises(CrflowError, match="never writes"):
        merge(tmp_path / "s", {"results...": b"x"}, "the Secret")
