import json

from fakes import rig


def test_what_should_run_is_config_plus_started_minus_stopped_and_survives_a_restart(tmp_path):
    r = rig(tmp_path, companies=("a", "b"))
    roster = r.arbiter.roster
    roster.want("z")
    roster.unwant("a")
    assert roster.wanted() == ["b", "z"]
    assert json.loads((tmp_path / "state" / "desired.json").read_text()) == {"started": ["z"], "stopped": ["a"]}
    assert (tmp_path / "state" / "desired.json").stat().st_mode & 0o777 == 0o600
    again = rig(tmp_path, companies=("a", "b")).arbiter.roster
    again.load()
    assert again.wanted() == ["b", "z"] and again.is_wanted("z") and not again.is_wanted("a")


def test_a_damaged_desired_file_is_kept_aside_and_the_config_still_runs(tmp_path, caplog):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "desired.json").write_text("{not json")
    roster = rig(tmp_path, companies=("a",)).arbiter.roster
    roster.load()
    assert roster.wanted() == ["a"]
    assert (tmp_path / "state" / "desired.json.corrupt").exists() and "unreadable" in caplog.text


def test_forgetting_a_company_removes_it_but_a_configured_one_stays_stopped(tmp_path):
    r = rig(tmp_path, companies=("a",))
    roster = r.arbiter.roster
    roster.want("a")
    roster.want("b")
    roster.forget("a")
    roster.forget("b")
    assert roster.get("a") is None and roster.get("b") is None
    assert roster.wanted() == []


def test_lookups_by_pid_and_routing_id_find_only_the_current_worker(tmp_path):
    r = rig(tmp_path)
    roster = r.arbiter.roster
    a, b = roster.want("a"), roster.want("b")
    a.start()
    b.start()
    assert roster.by_pid(a.worker.pid) is a and roster.by_pid(b.worker.pid) is b
    old_pid, old_id = a.worker.pid, a.worker.routing_id
    r.exit("a", 1)
    r.advance(5)
    assert a.worker is not None and a.worker.pid != old_pid
    assert roster.by_pid(old_pid) is None and roster.by_pid(a.worker.pid) is a
    assert roster.by_routing_id(old_id) is None and roster.by_routing_id(a.worker.routing_id) is a
    assert roster.running() == [a, b]
